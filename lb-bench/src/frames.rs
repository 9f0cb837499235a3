//! Benchmark frames: minimal, valid headers (checksums are not checked by
//! XDP and are left zero).

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
const CLIENT: [u8; 4] = [198, 18, 2, 2];
const VIP: [u8; 4] = [198, 18, 0, 100];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const VIP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

fn ethernet(ether_type: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0x1b, 0, 0, 0, 1, 0x02, 0xc1, 0, 0, 0, 1];
    f.extend(ether_type.to_be_bytes());
    f
}

fn ipv4(f: &mut Vec<u8>, src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: usize) {
    f.extend([0x45, 0]);
    f.extend(((20 + l4_len) as u16).to_be_bytes());
    f.extend([0, 0, 0x40, 0, 64, proto, 0, 0]);
    f.extend(src);
    f.extend(dst);
}

fn tcp(f: &mut Vec<u8>, sport: u16, dport: u16, flags: u8) {
    f.extend(sport.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
}

/// TCP to the IPv4 VIP, port 80.
pub fn tcp4(sport: u16, flags: u8) -> Vec<u8> {
    let mut f = ethernet(0x0800);
    ipv4(&mut f, CLIENT, VIP, 6, 20);
    tcp(&mut f, sport, 80, flags);
    pad(f)
}

/// TCP from the `i`-th client (address and port vary): a new flow each.
pub fn tcp4_from(i: u32, flags: u8) -> Vec<u8> {
    let mut f = ethernet(0x0800);
    let client = [198, 19, (i >> 16) as u8, (i >> 8) as u8];
    ipv4(&mut f, client, VIP, 6, 20);
    tcp(&mut f, 1024 + (i & 0xff) as u16, 80, flags);
    pad(f)
}

pub fn udp4(sport: u16) -> Vec<u8> {
    let mut f = ethernet(0x0800);
    ipv4(&mut f, CLIENT, VIP, 17, 8);
    f.extend(sport.to_be_bytes());
    f.extend(53u16.to_be_bytes());
    f.extend([0, 8, 0, 0]);
    pad(f)
}

pub fn tcp6(sport: u16, flags: u8) -> Vec<u8> {
    let mut f = ethernet(0x86dd);
    f.extend([0x60, 0, 0, 0, 0, 20, 6, 64]);
    f.extend(CLIENT6);
    f.extend(VIP6);
    tcp(&mut f, sport, 80, flags);
    f
}

pub fn non_vip() -> Vec<u8> {
    let mut f = ethernet(0x0800);
    ipv4(&mut f, CLIENT, [198, 18, 0, 200], 6, 20);
    tcp(&mut f, 40000, 80, ACK);
    pad(f)
}

/// UDP to the VIP, 64 bytes on the wire (60 + FCS), for the generator.
pub fn udp4_64() -> Vec<u8> {
    udp4(1024)
}

/// Ethernet minimum: 60 bytes before the FCS.
fn pad(mut f: Vec<u8>) -> Vec<u8> {
    f.resize(f.len().max(60), 0);
    f
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
    }
}
