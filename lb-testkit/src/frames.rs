//! Frames for packet tests and benchmarks: Ethernet, an optional VLAN tag,
//! IPv4 (with options, fragments) or IPv6 (with an extension header), TCP or
//! UDP. Checksums are left zero: XDP does not check them.

use std::net::IpAddr;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const FIN_ACK: u8 = FIN | ACK;
pub const PSH_ACK: u8 = PSH | ACK;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The client's side of the wire (source MAC of every frame).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
/// The load balancer's interface (destination MAC of every frame).
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x01];
/// Ethernet's minimum frame size before the FCS.
pub const MIN_FRAME: usize = 60;

#[derive(Clone, Debug)]
pub struct Frame {
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub ipv4_option_words: u8,
    pub frag: u16,
    pub ipv6_next_header: Option<u8>,
    pub payload: Vec<u8>,
}

pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Frame {
    Frame {
        vlan: None,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        proto: PROTO_TCP,
        sport,
        dport,
        tcp_flags: flags,
        ipv4_option_words: 0,
        frag: 0,
        ipv6_next_header: None,
        payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    }
}

pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Frame {
    Frame { proto: 17, tcp_flags: 0, payload: b"query".to_vec(), ..tcp(src, sport, dst, dport, 0) }
}

impl Frame {
    /// The same frame without payload: headers only.
    pub fn bare(self) -> Self {
        Frame { payload: Vec::new(), ..self }
    }

    /// `bytes()`, padded to Ethernet's minimum as a NIC would.
    pub fn padded(&self) -> Vec<u8> {
        let mut bytes = self.bytes();
        bytes.resize(bytes.len().max(MIN_FRAME), 0);
        bytes
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.sport.to_be_bytes());
        l4.extend(self.dport.to_be_bytes());
        if self.proto == PROTO_TCP {
            l4.extend(1000u32.to_be_bytes());
            l4.extend(0u32.to_be_bytes());
            l4.push(5 << 4);
            l4.push(self.tcp_flags);
            l4.extend(65535u16.to_be_bytes());
            l4.extend([0, 0, 0, 0]);
        } else {
            l4.extend((8 + self.payload.len() as u16).to_be_bytes());
            l4.extend([0, 0]);
        }
        l4.extend(&self.payload);

        let mut f = Vec::new();
        f.extend(LB_MAC);
        f.extend(CLIENT_MAC);
        if let Some(tci) = self.vlan {
            f.extend(0x8100u16.to_be_bytes());
            f.extend(tci.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend(0x0800u16.to_be_bytes());
                let ihl = 5 + self.ipv4_option_words;
                f.push(0x40 | ihl);
                f.push(0);
                f.extend((ihl as u16 * 4 + l4.len() as u16).to_be_bytes());
                f.extend([0x12, 0x34]);
                f.extend(self.frag.to_be_bytes());
                f.push(64);
                f.push(self.proto);
                f.extend([0, 0]);
                f.extend(s.octets());
                f.extend(d.octets());
                // NOP options, then the L4 header.
                f.extend(std::iter::repeat_n(1u8, self.ipv4_option_words as usize * 4));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend(0x86ddu16.to_be_bytes());
                f.extend([0x60, 0, 0, 0]);
                let ext = self.ipv6_next_header.is_some();
                f.extend((l4.len() as u16 + if ext { 8 } else { 0 }).to_be_bytes());
                f.push(self.ipv6_next_header.unwrap_or(self.proto));
                f.push(64);
                f.extend(s.octets());
                f.extend(d.octets());
                if ext {
                    // An empty hop-by-hop / destination options header.
                    f.extend([self.proto, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
            _ => panic!("mixed families"),
        }
        f.extend(l4);
        f
    }
}

impl Frame {
    /// `bytes()` with every checksum filled in (IPv4 header, TCP or UDP over
    /// the pseudo header), as a real sender's frame: what NAT must patch.
    /// Untagged, without IPv4 options or IPv6 extension headers.
    pub fn checksummed(&self) -> Vec<u8> {
        let mut f = self.bytes();
        let (l4, pseudo) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let check = internet_checksum(&f[14..34]);
                f[24..26].copy_from_slice(&check.to_be_bytes());
                (34, [s.octets().to_vec(), d.octets().to_vec()].concat())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => (54, [s.octets().to_vec(), d.octets().to_vec()].concat()),
            _ => panic!("mixed families"),
        };
        let len = (f.len() - l4) as u16;
        let mut summed = pseudo;
        summed.extend([0, self.proto]);
        summed.extend(len.to_be_bytes());
        summed.extend(&f[l4..]);
        let mut check = internet_checksum(&summed);
        let at = l4 + if self.proto == PROTO_TCP { 16 } else { 6 };
        if self.proto == PROTO_UDP && check == 0 {
            check = 0xffff;
        }
        f[at..at + 2].copy_from_slice(&check.to_be_bytes());
        f
    }
}

/// The frame as DSR must emit it: only the Ethernet addresses differ.
pub fn rewritten(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out
}

pub fn dst_mac(out: &[u8]) -> [u8; 6] {
    out[0..6].try_into().unwrap()
}

/// A tunnel as a test expects the load balancer to build it.
#[derive(Clone, Debug)]
pub struct Tunnel {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// GUE: (outer source port, destination port); `None` for IPIP.
    pub gue_ports: Option<(u16, u16)>,
    /// The outer IPv6 flow label (the flow hash's low 20 bits).
    pub flow_label: u32,
}

/// The Internet checksum (RFC 1071) of `bytes`, written independently of
/// the code under test.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `frame` (untagged) inside `tunnel`: the bytes xdplb must emit.
pub fn encapsulated(frame: &[u8], tunnel: &Tunnel) -> Vec<u8> {
    let inner = &frame[14..];
    let inner_v4 = inner[0] >> 4 == 4;
    let inner_len = if inner_v4 {
        u16::from_be_bytes([inner[2], inner[3]]) as usize
    } else {
        40 + u16::from_be_bytes([inner[4], inner[5]]) as usize
    };
    let inner = &inner[..inner_len];
    let tos = if inner_v4 { inner[1] } else { (inner[0] << 4) | (inner[1] >> 4) };
    let df = !inner_v4 || inner[6] & 0x40 != 0;
    let mut payload = Vec::new();
    let protocol = match tunnel.gue_ports {
        Some((sport, dport)) => {
            payload.extend(sport.to_be_bytes());
            payload.extend(dport.to_be_bytes());
            payload.extend((8 + inner_len as u16).to_be_bytes());
            payload.extend([0, 0]);
            PROTO_UDP
        }
        None if inner_v4 => 4,
        None => 41,
    };
    payload.extend(inner);
    let mut out = Vec::new();
    out.extend(tunnel.dst_mac);
    out.extend(tunnel.src_mac);
    match (tunnel.src, tunnel.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend(0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, tos];
            ip.extend((20 + payload.len() as u16).to_be_bytes());
            ip.extend([0, 0, if df { 0x40 } else { 0 }, 0, 64, protocol, 0, 0]);
            ip.extend(s.octets());
            ip.extend(d.octets());
            let check = internet_checksum(&ip);
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            out.extend(ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend(0x86ddu16.to_be_bytes());
            let first = 6u32 << 28 | u32::from(tos) << 20 | (tunnel.flow_label & 0xfffff);
            out.extend(first.to_be_bytes());
            out.extend((payload.len() as u16).to_be_bytes());
            out.extend([protocol, 64]);
            out.extend(s.octets());
            out.extend(d.octets());
        }
        _ => panic!("outer addresses of mixed families"),
    }
    out.extend(payload);
    out
}
