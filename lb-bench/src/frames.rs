//! Benchmark frames: headers only, padded to Ethernet's minimum (built by
//! the test kit's frame builder; checksums are not checked by XDP).

pub use lb_testkit::frames::{ACK, SYN};
use lb_testkit::frames::{tcp, udp};

const CLIENT: &str = "198.18.2.2";
const VIP: &str = "198.18.0.100";
const CLIENT6: &str = "2001:db8:2::2";
const VIP6: &str = "2001:db8::100";

/// TCP to the IPv4 VIP, port 80.
pub fn tcp4(sport: u16, flags: u8) -> Vec<u8> {
    tcp(CLIENT, sport, VIP, 80, flags).bare().padded()
}

/// TCP from the `i`-th client: 2^31 distinct five-tuples (source address
/// from 198.18.0.0/15, source port 1024..17408), a new flow each.
pub fn tcp4_from(i: u32, flags: u8) -> Vec<u8> {
    let host = 0xc612_0000 + ((i >> 14) & 0x1_ffff); // 198.18.0.0 + 17 bits
    let client = std::net::Ipv4Addr::from(host).to_string();
    tcp(&client, 1024 + (i & 0x3fff) as u16, VIP, 80, flags).bare().padded()
}

pub fn udp4(sport: u16) -> Vec<u8> {
    udp(CLIENT, sport, VIP, 53).bare().padded()
}

pub fn tcp6(sport: u16, flags: u8) -> Vec<u8> {
    tcp(CLIENT6, sport, VIP6, 80, flags).bare().padded()
}

pub fn non_vip() -> Vec<u8> {
    tcp(CLIENT, 40000, "198.18.0.200", 80, ACK).bare().padded()
}

/// UDP to the VIP, 64 bytes on the wire (60 + FCS), for the generator.
pub fn udp4_64() -> Vec<u8> {
    udp4(1024)
}

/// The same to the throughput topology's NAT service (port 55).
pub fn udp4_64_nat() -> Vec<u8> {
    udp(CLIENT, 1024, VIP, 55).bare().padded()
}

/// A backend's reply to a NAT flow: 198.18.1.11:80 → the NAT source
/// (198.18.2.1, the route source) at `nat_port`.
pub fn tcp4_nat_reply(nat_port: u16, flags: u8) -> Vec<u8> {
    tcp("198.18.1.11", 80, "198.18.2.1", nat_port, flags).bare().padded()
}

/// The same to the throughput topology's IPIP service (port 54).
pub fn udp4_64_tunnel() -> Vec<u8> {
    udp(CLIENT, 1024, VIP, 54).bare().padded()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_sizes_the_report_states() {
        assert_eq!(udp4_64().len(), 60);
        assert_eq!(tcp4(1024, ACK).len(), 60);
        assert_eq!(tcp6(1, SYN).len(), 14 + 40 + 20);
        // The generator rewrites the L4 source port at 14 + 20.
        assert_eq!(&udp4(0x1234)[34..36], &[0x12, 0x34]);
        assert_ne!(tcp4_from(1, SYN)[26..30], tcp4_from(1 << 16, SYN)[26..30]);
        // Distinct five-tuples across the whole range the fixtures use.
        assert_ne!(tcp4_from(0, SYN), tcp4_from(1 << 14, SYN));
        assert_ne!(tcp4_from(0, SYN), tcp4_from(1 << 30, SYN));
    }
}
