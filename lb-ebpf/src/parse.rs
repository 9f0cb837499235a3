//! Header parsing. Every read is preceded by an explicit bounds check against
//! `data_end`, so a truncated or malformed frame yields `Parsed::Unparsed`
//! and never an out-of-bounds read.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_IPV4, FAMILY_IPV6, FlowKey, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use lb_common::wire::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, VLAN_HLEN};

/// IPv4 "more fragments" flag and fragment offset mask.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
const IPV4_DF: u16 = lb_common::wire::IPV4_DF;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;

/// A TCP or UDP packet ready for classification.
pub struct Packet {
    pub flow: FlowKey,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// What a tunnel or a "too big" reply needs of the IP header.
    pub ip: IpInfo,
    /// Where the TCP or UDP header starts (NAT rewrites it).
    pub l4_offset: usize,
}

/// The IP header as forwarding needs it.
#[derive(Clone, Copy)]
pub struct IpInfo {
    /// Where the IP header starts (after Ethernet and any VLAN tag).
    pub offset: usize,
    /// The IP packet's length by its header (excluding Ethernet padding).
    pub len: u16,
    /// IPv4 TOS or IPv6 traffic class (DSCP and ECN), copied to outer headers.
    pub tos: u8,
    /// IPv4 "don't fragment"; always set for IPv6 (routers never fragment it).
    pub df: bool,
}

/// Why a packet could not be classified by port.
#[derive(Clone, Copy)]
pub enum Unclassifiable {
    Ipv4Fragment,
    Ipv6ExtensionHeader,
}

pub enum Parsed {
    Packet(Packet),
    /// An IP packet whose ports cannot be read; dropped if it is addressed to
    /// a VIP address (hashing it without ports would split its flow).
    Unclassifiable {
        dst: [u32; 4],
        family: u8,
        reason: Unclassifiable,
    },
    /// IP, but neither TCP nor UDP (ICMP, ...): never a VIP.
    OtherProtocol,
    /// Not IP, or too short to hold the headers it claims.
    Unparsed,
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    match parse_inner(ctx) {
        Some(parsed) => parsed,
        None => Parsed::Unparsed,
    }
}

#[inline(always)]
fn parse_inner(ctx: &XdpContext) -> Option<Parsed> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `eth` was bounds-checked against data_end just above.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3_offset = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        // One tag; the inner ethertype is the last two bytes of the tag.
        let inner: *const [u8; 2] = ptr_at(ctx, EthHdr::LEN + 2)?;
        // SAFETY: the VLAN tag was bounds-checked against data_end just above.
        ether_type = u16::from_be_bytes(unsafe { *inner });
        l3_offset += VLAN_HLEN;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3_offset),
        ETH_P_IPV6 => parse_ipv6(ctx, l3_offset),
        _ => None,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Option<Parsed> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: the IP header was bounds-checked against data_end just above.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return None;
    }
    let mut flow = FlowKey { family: FAMILY_IPV4, proto: ip.proto, ..FlowKey::default() };
    flow.src[0] = u32::from_ne_bytes(ip.src_addr);
    flow.dst[0] = u32::from_ne_bytes(ip.dst_addr);
    let frags = u16::from_be_bytes(ip.frags);
    if frags & IPV4_MF_OR_OFFSET != 0 {
        return Some(Parsed::Unclassifiable {
            dst: flow.dst,
            family: FAMILY_IPV4,
            reason: Unclassifiable::Ipv4Fragment,
        });
    }
    let info = IpInfo { offset, len: u16::from_be_bytes(ip.tot_len), tos: ip.tos, df: frags & IPV4_DF != 0 };
    parse_l4(ctx, offset + ihl * 4, flow, info)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Option<Parsed> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: the IP header was bounds-checked against data_end just above.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return None;
    }
    let mut flow = FlowKey { family: FAMILY_IPV6, proto: ip.next_hdr, ..FlowKey::default() };
    flow.src = words(&ip.src_addr);
    flow.dst = words(&ip.dst_addr);
    if is_ipv6_extension_header(flow.proto) {
        return Some(Parsed::Unclassifiable {
            dst: flow.dst,
            family: FAMILY_IPV6,
            reason: Unclassifiable::Ipv6ExtensionHeader,
        });
    }
    let info = IpInfo {
        offset,
        len: u16::from_be_bytes(ip.payload_len).saturating_add(Ipv6Hdr::LEN as u16),
        tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
        df: true,
    };
    parse_l4(ctx, offset + Ipv6Hdr::LEN, flow, info)
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, offset: usize, mut flow: FlowKey, ip: IpInfo) -> Option<Parsed> {
    let tcp_flags = match flow.proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, offset)?;
            // The flags byte is read through the checked header pointer: a
            // second ptr_at would be folded away by the compiler and leave
            // the verifier without a range for the new pointer.
            // SAFETY: the whole TCP header, flags byte included, was bounds-checked just above.
            let flags = unsafe { *(tcp as *const u8).add(TCP_FLAGS_OFFSET) };
            // SAFETY: the TCP header was bounds-checked against data_end just above.
            let tcp = unsafe { &*tcp };
            flow.sport = u16::from_ne_bytes(tcp.source);
            flow.dport = u16::from_ne_bytes(tcp.dest);
            flags
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, offset)?;
            // SAFETY: the UDP header was bounds-checked against data_end just above.
            let udp = unsafe { &*udp };
            flow.sport = u16::from_ne_bytes(udp.src);
            flow.dport = u16::from_ne_bytes(udp.dst);
            0
        }
        _ => return Some(Parsed::OtherProtocol),
    };
    Some(Parsed::Packet(Packet { flow, tcp_flags, ip, l4_offset: offset }))
}

#[inline(always)]
fn is_ipv6_extension_header(next_header: u8) -> bool {
    // Hop-by-hop, routing, fragment, ESP, AH, destination options, mobility,
    // HIP, shim6 (RFC 7045's list).
    matches!(next_header, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140)
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}
