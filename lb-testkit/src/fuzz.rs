//! Packet fuzzing: mutated frames, and a reference parser of the rules the
//! data plane documents, written apart from the program's own parser so
//! that a shared mistake is unlikely. The checks (what each mode may do
//! with a frame) live with the tests that own the services.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A small, fast, seeded generator (xorshift64*): runs are reproducible
/// from their seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// How a frame was mutated (for failure reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// The base frame, cut at every length in turn.
    Truncated,
    BitFlips,
    /// Random bytes of a random length.
    Random,
    /// The IPv4 IHL, total length, IPv6 payload length or TCP data offset
    /// set to a random value.
    BogusLength,
    /// Fragment fields, next header or protocol set to a random value.
    BogusProtocol,
    /// A VLAN or QinQ tag inserted, or the ethertype changed.
    Tagged,
}

/// Frames without end: every base frame cut at every length first, then
/// random mutations of random base frames. Reproducible from `seed`.
pub fn mutated(bases: &[Vec<u8>], seed: u64) -> impl Iterator<Item = (Mutation, Vec<u8>)> + '_ {
    let truncations =
        bases.iter().flat_map(|base| (0..base.len()).map(move |len| (Mutation::Truncated, base[..len].to_vec())));
    let mut rng = Rng::new(seed);
    let random = std::iter::repeat_with(move || mutate(bases, &mut rng));
    truncations.chain(random)
}

fn mutate(bases: &[Vec<u8>], rng: &mut Rng) -> (Mutation, Vec<u8>) {
    let mut frame = bases[rng.below(bases.len())].clone();
    let ip = ip_offset(&frame);
    let kind = match rng.below(6) {
        0 => Mutation::BitFlips,
        1 => Mutation::Random,
        2 => Mutation::BogusLength,
        3 => Mutation::BogusProtocol,
        4 => Mutation::Tagged,
        _ => Mutation::BitFlips,
    };
    match kind {
        Mutation::BitFlips => {
            // Mostly in the headers, where the parser looks.
            for _ in 0..1 + rng.below(8) {
                let span = if rng.below(4) == 0 { frame.len() } else { frame.len().min(80) };
                let at = rng.below(span);
                frame[at] ^= 1 << rng.below(8);
            }
        }
        Mutation::Random => {
            let len = rng.below(200);
            frame = (0..len).map(|_| rng.next_u64() as u8).collect();
            if len >= 14 && rng.below(2) == 0 {
                // An IP ethertype, so the random bytes reach the IP parser.
                let ethertype: u16 = if rng.below(2) == 0 { 0x0800 } else { 0x86dd };
                frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            }
        }
        Mutation::BogusLength => {
            let value = rng.next_u64() as u16;
            match (ip, frame.get(ip).map(|b| b >> 4)) {
                (ip, Some(4)) if frame.len() >= ip + 20 => match rng.below(3) {
                    0 => frame[ip] = 0x40 | (value as u8 & 0x0f),
                    1 => frame[ip + 2..ip + 4].copy_from_slice(&value.to_be_bytes()),
                    _ => {
                        let l4 = ip + 4 * (frame[ip] & 0x0f) as usize;
                        set_tcp_offset(&mut frame, l4, value)
                    }
                },
                (ip, Some(6)) if frame.len() >= ip + 40 => match rng.below(2) {
                    0 => frame[ip + 4..ip + 6].copy_from_slice(&value.to_be_bytes()),
                    _ => set_tcp_offset(&mut frame, ip + 40, value),
                },
                _ => frame.truncate(rng.below(frame.len() + 1)),
            }
        }
        Mutation::BogusProtocol => {
            let value = rng.next_u64() as u8;
            match frame.get(ip).map(|b| b >> 4) {
                Some(4) if frame.len() >= ip + 20 => {
                    if rng.below(2) == 0 {
                        frame[ip + 9] = value;
                    } else {
                        // MF, DF, offset: fragments and not.
                        frame[ip + 6] = value;
                        frame[ip + 7] = rng.next_u64() as u8;
                    }
                }
                Some(6) if frame.len() >= ip + 40 => {
                    // Extension headers, or anything at all.
                    const EXTENSIONS: [u8; 9] = [0, 43, 44, 50, 51, 60, 135, 139, 140];
                    frame[ip + 6] = if rng.below(2) == 0 { EXTENSIONS[rng.below(9)] } else { value };
                }
                _ => frame.truncate(rng.below(frame.len() + 1)),
            }
        }
        Mutation::Tagged => {
            if frame.len() >= 14 {
                match rng.below(3) {
                    0 => {
                        let tag = [0x81, 0x00, 0x00, rng.next_u64() as u8];
                        frame.splice(12..12, tag);
                    }
                    1 => {
                        // QinQ: an 802.1ad tag around an 802.1Q one.
                        let tags = [0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x00, 0x64];
                        frame.splice(12..12, tags);
                    }
                    _ => {
                        let value = rng.next_u64() as u16;
                        frame[12..14].copy_from_slice(&value.to_be_bytes());
                    }
                }
            }
        }
        Mutation::Truncated => {}
    }
    (kind, frame)
}

fn set_tcp_offset(frame: &mut [u8], l4: usize, value: u16) {
    if let Some(byte) = frame.get_mut(l4 + 12) {
        *byte = (value as u8) & 0xf0 | (*byte & 0x0f);
    }
}

/// Where the IP header would start (after one VLAN tag at most).
fn ip_offset(frame: &[u8]) -> usize {
    match frame.get(12..14) {
        Some([0x81, 0x00] | [0x88, 0xa8]) => 18,
        _ => 14,
    }
}

/// What the data plane's documented parsing makes of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not IP (one VLAN tag at most), a wrong IP version or IHL, or too
    /// short for the headers it claims: passed untouched.
    Unparsed,
    /// IP, neither TCP nor UDP: never a VIP.
    OtherProtocol,
    /// An IPv4 fragment or an IPv6 packet with an extension header: dropped
    /// if addressed to a VIP address, else passed.
    Unclassifiable {
        dst: IpAddr,
    },
    Packet(Packet),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub ip_offset: usize,
    pub l4_offset: usize,
    /// The IP packet's length by its header.
    pub ip_len: usize,
}

pub fn parse(frame: &[u8]) -> Parsed {
    parse_frame(frame).unwrap_or(Parsed::Unparsed)
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
}

fn parse_frame(frame: &[u8]) -> Option<Parsed> {
    let mut ethertype = be16(frame, 12)?;
    let mut ip = 14;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = be16(frame, 16)?;
        ip = 18;
    }
    let header = |len: usize| frame.get(ip..ip + len);
    let (src, dst, proto, l4, ip_len): (IpAddr, IpAddr, u8, usize, usize) = match ethertype {
        0x0800 => {
            let h = header(20)?;
            let ihl = (h[0] & 0x0f) as usize;
            if h[0] >> 4 != 4 || ihl < 5 {
                return None;
            }
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]).into();
            let dst: IpAddr = Ipv4Addr::new(h[16], h[17], h[18], h[19]).into();
            if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return Some(Parsed::Unclassifiable { dst });
            }
            (src, dst, h[9], ip + ihl * 4, u16::from_be_bytes([h[2], h[3]]) as usize)
        }
        0x86dd => {
            let h = header(40)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let address =
                |at: usize| -> IpAddr { Ipv6Addr::from(<[u8; 16]>::try_from(&h[at..at + 16]).unwrap()).into() };
            let (src, dst) = (address(8), address(24));
            if matches!(h[6], 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140) {
                return Some(Parsed::Unclassifiable { dst });
            }
            (src, dst, h[6], ip + 40, 40 + u16::from_be_bytes([h[4], h[5]]) as usize)
        }
        _ => return None,
    };
    let (header_len, tcp_flags) = match proto {
        6 => (20, *frame.get(l4 + 13)?),
        17 => (8, 0),
        _ => return Some(Parsed::OtherProtocol),
    };
    frame.get(l4..l4 + header_len)?;
    Some(Parsed::Packet(Packet {
        src,
        dst,
        proto,
        sport: be16(frame, l4)?,
        dport: be16(frame, l4 + 2)?,
        tcp_flags,
        ip_offset: ip,
        l4_offset: l4,
        ip_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{SYN, tcp, udp};

    #[test]
    fn the_reference_parser_reads_what_the_frames_module_builds() {
        let syn = tcp("198.18.0.2", 40000, "198.18.0.100", 80, SYN).bytes();
        let Parsed::Packet(p) = parse(&syn) else { panic!("{:?}", parse(&syn)) };
        assert_eq!((p.sport, p.dport, p.proto, p.tcp_flags, p.l4_offset), (40000, 80, 6, SYN, 34));
        let query = udp("2001:db8::2", 5353, "2001:db8::100", 53).bytes();
        let Parsed::Packet(p) = parse(&query) else { panic!() };
        assert_eq!((p.dst, p.dport, p.l4_offset), ("2001:db8::100".parse().unwrap(), 53, 54));
        // Cut inside the TCP header: the ports may be there, but not the header.
        assert_eq!(parse(&syn[..34 + 19]), Parsed::Unparsed);
        let mut fragment = syn.clone();
        fragment[20] = 0x20; // MF
        assert_eq!(parse(&fragment), Parsed::Unclassifiable { dst: "198.18.0.100".parse().unwrap() });
    }

    #[test]
    fn mutations_are_reproducible_and_start_with_every_truncation() {
        let bases = vec![tcp("198.18.0.2", 1, "198.18.0.100", 80, SYN).bytes()];
        let a: Vec<_> = mutated(&bases, 7).take(500).collect();
        let b: Vec<_> = mutated(&bases, 7).take(500).collect();
        assert_eq!(a, b);
        assert!(a[..bases[0].len()].iter().enumerate().all(|(i, (m, f))| *m == Mutation::Truncated && f.len() == i));
        assert!(a.iter().any(|(m, _)| *m == Mutation::Tagged) && a.iter().any(|(m, _)| *m == Mutation::BogusLength));
    }
}
