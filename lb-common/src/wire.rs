//! Headers the data plane writes, built as bytes by pure functions: the
//! outer headers of tunnelled packets and the ICMP "too big" messages. The
//! XDP and tc programs copy them in front of a packet; tests compare them
//! byte for byte. Addresses are `[u32; 4]` words as `layout` stores them
//! (wire order, `from_ne_bytes`).

use crate::{
    FAMILY_IPV4, GUE_SOURCE_PORT_MIN, GUE_SOURCE_PORT_SPAN, IPV4_MIN_REPORTED_MTU, IPV6_MIN_MTU, PROTO_UDP, TUNNEL_TTL,
    forwarding,
};

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// VLAN tag types (802.1Q, 802.1ad); one tag is four bytes.
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const VLAN_HLEN: usize = 4;
/// IP protocol numbers of an encapsulated IPv4 / IPv6 packet.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 "don't fragment".
pub const IPV4_DF: u16 = 0x4000;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;

/// Bytes a tunnel puts between the Ethernet header and the inner IP packet.
#[inline(always)]
pub const fn tunnel_overhead(outer_family: u8, mode: u8) -> usize {
    let ip = if outer_family == FAMILY_IPV4 { IPV4_HLEN } else { IPV6_HLEN };
    if mode == forwarding::GUE { ip + UDP_HLEN } else { ip }
}

/// The protocol number an outer header announces for an inner packet.
#[inline(always)]
pub const fn inner_protocol(inner_family: u8) -> u8 {
    if inner_family == FAMILY_IPV4 { IPPROTO_IPIP } else { IPPROTO_IPV6 }
}

/// The MTU a client is told in "too big": what the path carries minus the
/// tunnel, never below what its family guarantees (IPv6) or what TCP can
/// use (IPv4).
#[inline(always)]
pub const fn usable_mtu(path_mtu: u16, overhead: usize, inner_family: u8) -> u16 {
    let usable = (path_mtu as usize).saturating_sub(overhead) as u16;
    let floor = if inner_family == FAMILY_IPV4 { IPV4_MIN_REPORTED_MTU } else { IPV6_MIN_MTU };
    if usable < floor { floor } else { usable }
}

/// GUE's outer source port: spread by the flow hash over the ephemeral
/// range, so receivers' RSS spreads flows over queues; stable per flow.
#[inline(always)]
pub const fn gue_source_port(flow_hash: u32) -> u16 {
    GUE_SOURCE_PORT_MIN + (flow_hash % GUE_SOURCE_PORT_SPAN) as u16
}

/// One's-complement sum folded to 16 bits (not complemented).
#[inline(always)]
pub const fn fold(sum: u64) -> u16 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Sum of an address word's two 16-bit halves as they lie on the wire.
#[inline(always)]
const fn word_sum(word: u32) -> u64 {
    let b = word.to_ne_bytes();
    (u16::from_be_bytes([b[0], b[1]]) as u64) + (u16::from_be_bytes([b[2], b[3]]) as u64)
}

/// Sum of an IPv6 address's eight 16-bit words (for pseudo headers).
#[inline(always)]
pub const fn address_sum(addr: &[u32; 4]) -> u64 {
    word_sum(addr[0]) + word_sum(addr[1]) + word_sum(addr[2]) + word_sum(addr[3])
}

/// An IPv4 header without options, checksum filled in. `df` sets "don't
/// fragment"; the identification is 0, as for any DF packet (RFC 6864).
#[inline(always)]
pub const fn ipv4_header(tos: u8, total_len: u16, df: bool, ttl: u8, protocol: u8, src: u32, dst: u32) -> [u8; 20] {
    let frag = if df { IPV4_DF } else { 0 };
    let sum = 0x4500u64
        + tos as u64
        + total_len as u64
        + frag as u64
        + ((ttl as u64) << 8 | protocol as u64)
        + word_sum(src)
        + word_sum(dst);
    let check = !fold(sum);
    let len = total_len.to_be_bytes();
    let frag = frag.to_be_bytes();
    let check = check.to_be_bytes();
    let s = src.to_ne_bytes();
    let d = dst.to_ne_bytes();
    [
        0x45, tos, len[0], len[1], 0, 0, frag[0], frag[1], ttl, protocol, check[0], check[1], s[0], s[1], s[2], s[3],
        d[0], d[1], d[2], d[3],
    ]
}

/// The outer IPv4 header of a tunnelled packet.
#[inline(always)]
pub const fn outer_ipv4(tos: u8, payload_len: u16, df: bool, protocol: u8, src: u32, dst: u32) -> [u8; 20] {
    ipv4_header(tos, payload_len + IPV4_HLEN as u16, df, TUNNEL_TTL, protocol, src, dst)
}

/// An IPv6 header. The flow label carries a flow hash (RFC 6438), so that
/// routers' ECMP keeps each tunnelled flow on one path.
#[inline(always)]
pub const fn ipv6_header(
    traffic_class: u8,
    flow_label: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
) -> [u8; 40] {
    let first = (6u32 << 28 | (traffic_class as u32) << 20 | (flow_label & 0xf_ffff)).to_be_bytes();
    let len = payload_len.to_be_bytes();
    let mut h = [0u8; 40];
    h[0] = first[0];
    h[1] = first[1];
    h[2] = first[2];
    h[3] = first[3];
    h[4] = len[0];
    h[5] = len[1];
    h[6] = next_header;
    h[7] = hop_limit;
    let mut i = 0;
    while i < 4 {
        let s = src[i].to_ne_bytes();
        let d = dst[i].to_ne_bytes();
        let mut j = 0;
        while j < 4 {
            h[8 + i * 4 + j] = s[j];
            h[24 + i * 4 + j] = d[j];
            j += 1;
        }
        i += 1;
    }
    h
}

/// The outer IPv6 header of a tunnelled packet.
#[inline(always)]
pub const fn outer_ipv6(
    traffic_class: u8,
    flow_hash: u32,
    payload_len: u16,
    next_header: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
) -> [u8; 40] {
    ipv6_header(traffic_class, flow_hash, payload_len, next_header, TUNNEL_TTL, src, dst)
}

/// GUE's UDP header. The checksum is 0: the inner packet carries its own,
/// and RFC 6935 allows a zero UDP checksum for tunnels over IPv6 too (as
/// Katran and the kernel's fou do).
#[inline(always)]
pub const fn gue_udp_header(source_port: u16, gue_port_be: u16, payload_len: u16) -> [u8; 8] {
    let s = source_port.to_be_bytes();
    let d = gue_port_be.to_ne_bytes();
    let l = (payload_len + UDP_HLEN as u16).to_be_bytes();
    [s[0], s[1], d[0], d[1], l[0], l[1], 0, 0]
}

/// Protocol numbers of a tunnel's outer header, for checks.
#[inline(always)]
pub const fn outer_protocol(mode: u8, inner_family: u8) -> u8 {
    if mode == forwarding::GUE { PROTO_UDP } else { inner_protocol(inner_family) }
}

/// The ICMP "fragmentation needed" header (RFC 1191) with its checksum
/// computed from `quote_sum`, the one's-complement sum of the quoted bytes.
#[inline(always)]
pub const fn icmp_frag_needed(mtu: u16, quote_sum: u64) -> [u8; 8] {
    let sum = ((ICMP_DEST_UNREACH as u64) << 8 | ICMP_FRAG_NEEDED as u64) + mtu as u64 + quote_sum;
    let c = (!fold(sum)).to_be_bytes();
    let m = mtu.to_be_bytes();
    [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, c[0], c[1], 0, 0, m[0], m[1]]
}

/// The ICMPv6 "packet too big" header (RFC 4443) with its checksum over
/// the pseudo header (`src`, `dst`, `length`) and `quote_sum`.
#[inline(always)]
pub const fn icmpv6_packet_too_big(mtu: u16, src: &[u32; 4], dst: &[u32; 4], length: u16, quote_sum: u64) -> [u8; 8] {
    let sum = address_sum(src)
        + address_sum(dst)
        + length as u64
        + IPPROTO_ICMPV6 as u64
        + ((ICMPV6_PKT_TOOBIG as u64) << 8)
        + mtu as u64
        + quote_sum;
    let c = (!fold(sum)).to_be_bytes();
    let m = (mtu as u32).to_be_bytes();
    [ICMPV6_PKT_TOOBIG, 0, c[0], c[1], m[0], m[1], m[2], m[3]]
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::{FAMILY_IPV6, PROTO_TCP};

    fn v4(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// The RFC 1071 way, for comparison: sum all 16-bit words, fold, invert.
    fn reference_checksum(bytes: &[u8]) -> u16 {
        let mut sum = 0u64;
        for pair in bytes.chunks(2) {
            sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u64;
        }
        !fold(sum)
    }

    #[test]
    fn ipv4_header_checksum_verifies() {
        let h = outer_ipv4(0x10, 60, true, IPPROTO_IPIP, v4([198, 18, 2, 1]), v4([198, 18, 3, 11]));
        assert_eq!(&h[..12], &[0x45, 0x10, 0, 80, 0, 0, 0x40, 0, 64, 4, h[10], h[11]]);
        assert_eq!(&h[12..], &[198, 18, 2, 1, 198, 18, 3, 11]);
        // A header with a correct checksum sums to 0xffff.
        assert_eq!(reference_checksum(&h), 0);
        // The classic example (Wikipedia, "IPv4 header checksum"): b861.
        let h = ipv4_header(0, 0x73, true, 64, 17, v4([192, 168, 0, 1]), v4([192, 168, 0, 199]));
        assert_eq!([h[10], h[11]], [0xb8, 0x61]);
    }

    #[test]
    fn ipv6_header_fields() {
        let src = [v4([0x20, 0x01, 0x0d, 0xb8]), 0, 0, v4([0, 0, 0, 1])];
        let dst = [v4([0x20, 0x01, 0x0d, 0xb8]), 0, 0, v4([0, 0, 0, 2])];
        let h = outer_ipv6(0xb8, 0x1234_5678, 100, IPPROTO_IPV6, &src, &dst);
        assert_eq!(&h[..8], &[0x6b, 0x84, 0x56, 0x78, 0, 100, 41, 64]);
        assert_eq!(&h[8..12], &[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(h[23], 1);
        assert_eq!(h[39], 2);
    }

    #[test]
    fn gue_ports_and_lengths() {
        let h = gue_udp_header(gue_source_port(0xffff_ffff), 6080u16.to_be(), 40);
        assert_eq!(h, [0xff, 0xff, 0x17, 0xc0, 0, 48, 0, 0]);
        assert_eq!(gue_source_port(0), 49152);
        assert_eq!(gue_source_port(16384), 49152);
    }

    #[test]
    fn overheads_and_usable_mtu() {
        assert_eq!(tunnel_overhead(FAMILY_IPV4, forwarding::IPIP), 20);
        assert_eq!(tunnel_overhead(FAMILY_IPV4, forwarding::GUE), 28);
        assert_eq!(tunnel_overhead(FAMILY_IPV6, forwarding::IPIP), 40);
        assert_eq!(tunnel_overhead(FAMILY_IPV6, forwarding::GUE), 48);
        assert_eq!(usable_mtu(1500, 20, FAMILY_IPV4), 1480);
        assert_eq!(usable_mtu(1300, 48, FAMILY_IPV6), 1280);
        assert_eq!(usable_mtu(100, 48, FAMILY_IPV4), 576);
        assert_eq!(outer_protocol(forwarding::GUE, FAMILY_IPV6), PROTO_UDP);
        assert_eq!(outer_protocol(forwarding::IPIP, FAMILY_IPV6), IPPROTO_IPV6);
        assert_ne!(outer_protocol(forwarding::IPIP, FAMILY_IPV4), PROTO_TCP);
    }

    #[test]
    fn icmp_checksums_verify() {
        let quote: [u8; 8] = [0x45, 0, 5, 0xdc, 0x12, 0x34, 0x40, 0x00];
        let quote_sum = quote.chunks(2).map(|p| u16::from_be_bytes([p[0], p[1]]) as u64).sum();
        let h = icmp_frag_needed(1480, quote_sum);
        let mut message = h.to_vec();
        message.extend_from_slice(&quote);
        assert_eq!(reference_checksum(&message), 0);

        let src = [v4([0x20, 0x01, 0x0d, 0xb8]), 0, 0, v4([0, 0, 1, 0])];
        let dst = [v4([0x20, 0x01, 0x0d, 0xb8]), 0, 0, v4([0, 0, 0, 7])];
        let h = icmpv6_packet_too_big(1452, &src, &dst, 16, quote_sum);
        let mut pseudo: Vec<u8> = Vec::new();
        for w in src.iter().chain(dst.iter()) {
            pseudo.extend_from_slice(&w.to_ne_bytes());
        }
        pseudo.extend_from_slice(&16u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&h);
        pseudo.extend_from_slice(&quote);
        assert_eq!(reference_checksum(&pseudo), 0);
        assert_eq!(&h[4..], &1452u32.to_be_bytes());
    }
}
