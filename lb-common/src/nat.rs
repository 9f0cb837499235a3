//! Pure pieces of NAT forwarding: incremental checksum updates (RFC 1624)
//! and source-port candidates. The data plane rewrites addresses and ports
//! in place and patches the IP, TCP and UDP checksums from the difference,
//! never re-summing the payload.
//!
//! Every function works on words as they lie in memory (read with native
//! byte order, like the `[u32; 4]` addresses of `layout`): the one's-
//! complement sum is byte-order independent (RFC 1071 §2(B)), so a checksum
//! patched from raw words and stored back raw is correct on the wire.

use crate::{FLOW_F_FINISHED, FlowKey, NAT_FLOW_F_PINNED, NatFlow, PROTO_UDP, SYN_RETRANSMIT_WINDOW_NS, wire::fold};

/// Sum of a 32-bit word's two 16-bit halves (one's-complement addends).
#[inline(always)]
pub const fn sum32(word: u32) -> u64 {
    (word >> 16) as u64 + (word & 0xffff) as u64
}

/// Sum of an address's 16-bit words (IPv4 in the first word, the rest 0).
#[inline(always)]
pub const fn address_words(addr: &[u32; 4]) -> u64 {
    sum32(addr[0]) + sum32(addr[1]) + sum32(addr[2]) + sum32(addr[3])
}

/// A checksum field after data summing to `removed` was replaced by data
/// summing to `added`: HC' = ~(~HC + ~m + m') (RFC 1624, eqn. 3).
#[inline(always)]
pub const fn replace(check: u16, removed: u64, added: u64) -> u16 {
    !fold(!check as u64 + !fold(removed) as u64 + added)
}

/// The same for a UDP checksum. Over IPv4, 0 means "no checksum" and stays
/// 0; a computed 0 is sent as 0xffff (RFC 768), which the receiver reads as
/// the same value.
#[inline(always)]
pub const fn replace_udp(check: u16, removed: u64, added: u64, ipv4: bool) -> u16 {
    if ipv4 && check == 0 {
        return 0;
    }
    match replace(check, removed, added) {
        0 => 0xffff,
        updated => updated,
    }
}

/// How many source ports a new flow tries before it is refused as
/// "pool exhausted". A pool no larger than this is searched completely.
pub const NAT_PORT_ATTEMPTS: u32 = 32;

/// The `attempt`-th source port a new flow tries, host order: linear
/// probing from a start drawn at random (`start`) over the pool's `count`
/// ports, which run from `low` and jump over `skip_len` ports at
/// `skip_from` (the kernel's own ephemeral range, so that the LB's own
/// connections never meet a translation). Which port is free is decided by
/// the reverse table (an insert that fails if the translation exists).
#[inline(always)]
pub const fn candidate_port(start: u32, attempt: u32, low: u16, count: u32, skip_from: u16, skip_len: u16) -> u16 {
    if count == 0 {
        return low;
    }
    let port = low as u32 + (start % count + attempt % count) % count;
    let port = if skip_len > 0 && port >= skip_from as u32 { port + skip_len as u32 } else { port };
    port as u16
}

/// A pool `[low, high]` without the ports of `exclude` (inclusive): its
/// size and where the jump is, as `candidate_port` takes them:
/// (count, skip_from, skip_len).
pub const fn pool_without(low: u16, high: u16, exclude: Option<(u16, u16)>) -> (u32, u16, u16) {
    let total = high as u32 - low as u32 + 1;
    let Some((from, to)) = exclude else {
        return (total, 0, 0);
    };
    // The part of the exclusion inside the pool.
    let from = if from < low { low } else { from };
    let to = if to > high { high } else { to };
    if from > to {
        return (total, 0, 0);
    }
    let len = to as u32 - from as u32 + 1;
    if len >= total {
        // Nothing left: keep the pool rather than have none.
        return (total, 0, 0);
    }
    (total - len, from, len as u16)
}

/// How many attempts a pool of `count` ports gets.
#[inline(always)]
pub const fn attempts(count: u32) -> u32 {
    if count < NAT_PORT_ATTEMPTS { count } else { NAT_PORT_ATTEMPTS }
}

/// The five-tuple a backend's replies to a translated flow arrive with,
/// which keys `NAT_REPLIES`: from the backend to the flow's NAT source
/// (`nat_addr`, `nat_port`). Ports in network byte order.
#[inline(always)]
pub const fn reply_key(
    flow: &FlowKey,
    backend_addr: [u32; 4],
    backend_port: u16,
    nat_addr: [u32; 4],
    nat_port: u16,
) -> FlowKey {
    FlowKey {
        src: backend_addr,
        dst: nat_addr,
        sport: backend_port,
        dport: nat_port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    }
}

/// What a translation says of its flow at `now`: the one reading of a
/// `NatFlow`'s flags and age, for a SYN, for any other packet the full way,
/// and for the established packet's shortcut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatFlowPhase {
    /// A SYN's translation, not yet confirmed by the client's ACK (its
    /// half-open record); `young`: a retransmitted SYN keeps its backend.
    Handshake { young: bool },
    /// A handshake the client ended (FIN or RST) before its ACK: the flow
    /// keeps nothing.
    Aborted,
    /// Pinned to its backend by a packet after the SYN.
    Live,
    /// Pinned, and ended by FIN or RST: its last packets keep the backend.
    Finished,
    /// A pinned UDP flow idle past its timeout: scheduled afresh.
    Idle,
}

impl NatFlow {
    /// This translation's phase at `now`, for a flow of `proto`.
    #[inline(always)]
    pub fn phase(&self, now: u64, proto: u8, udp_idle_timeout_ns: u64) -> NatFlowPhase {
        let finished = self.flags & FLOW_F_FINISHED != 0;
        let idle_ns = now.saturating_sub(self.last_seen_ns);
        if self.flags & NAT_FLOW_F_PINNED == 0 {
            return if finished {
                NatFlowPhase::Aborted
            } else {
                NatFlowPhase::Handshake { young: idle_ns <= SYN_RETRANSMIT_WINDOW_NS }
            };
        }
        if finished {
            NatFlowPhase::Finished
        } else if proto == PROTO_UDP && idle_ns > udp_idle_timeout_ns {
            NatFlowPhase::Idle
        } else {
            NatFlowPhase::Live
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::BTreeSet, vec::Vec};

    use super::*;
    use crate::wire::{IPV4_HLEN, IPV6_HLEN};

    /// RFC 1071 over bytes, for comparison (odd lengths padded with 0).
    fn full_sum(bytes: &[u8]) -> u64 {
        bytes.chunks(2).map(|p| u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]) as u64).sum()
    }

    /// A v4 or v6 IP packet with a UDP or TCP header and `payload` bytes,
    /// every checksum computed in full.
    fn packet(v6: bool, tcp: bool, src: &[u8], dst: &[u8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let l4_len = if tcp { 20 } else { 8 } + payload.len();
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        if tcp {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            l4.extend_from_slice(&(l4_len as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(payload);
        let proto = if tcp { 6u8 } else { 17 };
        let pseudo = full_sum(src) + full_sum(dst) + proto as u64 + l4_len as u64;
        let check = !fold(pseudo + full_sum(&l4));
        let at = if tcp { 16 } else { 6 };
        l4[at..at + 2].copy_from_slice(&check.to_be_bytes());
        let mut ip = Vec::new();
        if v6 {
            ip.extend_from_slice(&[0x60, 0, 0, 0]);
            ip.extend_from_slice(&(l4_len as u16).to_be_bytes());
            ip.extend_from_slice(&[proto, 64]);
            ip.extend_from_slice(src);
            ip.extend_from_slice(dst);
        } else {
            ip.extend_from_slice(&[0x45, 0]);
            ip.extend_from_slice(&((IPV4_HLEN + l4_len) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            ip.extend_from_slice(src);
            ip.extend_from_slice(dst);
            let check = !fold(full_sum(&ip));
            ip[10..12].copy_from_slice(&check.to_be_bytes());
        }
        ip.extend_from_slice(&l4);
        ip
    }

    fn raw16(bytes: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([bytes[at], bytes[at + 1]])
    }

    fn address(bytes: &[u8]) -> [u32; 4] {
        let mut addr = [0u32; 4];
        for (i, chunk) in bytes.chunks(4).enumerate() {
            addr[i] = u32::from_ne_bytes(chunk.try_into().unwrap());
        }
        addr
    }

    /// Rewrites source and destination (address and port) of `p` the way
    /// the data plane does: in place, checksums patched incrementally.
    fn translate(p: &mut [u8], v6: bool, tcp: bool, src: &[u8], dst: &[u8], sport: u16, dport: u16) {
        let (addr_at, alen, l4) = if v6 { (8, 16, IPV6_HLEN) } else { (12, 4, IPV4_HLEN) };
        let old_addrs = address_words(&address(&p[addr_at..addr_at + alen]))
            + address_words(&address(&p[addr_at + alen..addr_at + 2 * alen]));
        let old_ports = sum32(u32::from_ne_bytes(p[l4..l4 + 4].try_into().unwrap()));
        p[addr_at..addr_at + alen].copy_from_slice(src);
        p[addr_at + alen..addr_at + 2 * alen].copy_from_slice(dst);
        p[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
        p[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
        let new_addrs = address_words(&address(src)) + address_words(&address(dst));
        let new_ports = sum32(u32::from_ne_bytes(p[l4..l4 + 4].try_into().unwrap()));
        if !v6 {
            let check = replace(raw16(p, 10), old_addrs, new_addrs);
            p[10..12].copy_from_slice(&check.to_ne_bytes());
        }
        let at = l4 + if tcp { 16 } else { 6 };
        let (removed, added) = (old_addrs + old_ports, new_addrs + new_ports);
        let check =
            if tcp { replace(raw16(p, at), removed, added) } else { replace_udp(raw16(p, at), removed, added, !v6) };
        p[at..at + 2].copy_from_slice(&check.to_ne_bytes());
    }

    const CLIENT4: [u8; 4] = [198, 18, 0, 1];
    const VIP4: [u8; 4] = [198, 18, 0, 100];
    const NAT4: [u8; 4] = [198, 18, 2, 1];
    const BACKEND4: [u8; 4] = [198, 18, 1, 11];
    const CLIENT6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const VIP6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const NAT6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1];
    const BACKEND6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x11];

    #[test]
    fn incremental_updates_equal_a_full_recompute() {
        // Payload lengths odd and even, and payloads whose sums carry.
        for len in [0usize, 1, 2, 3, 17, 64, 1001] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 151 + 255) as u8).collect();
            for (v6, client, vip, nat, backend) in [
                (false, &CLIENT4[..], &VIP4[..], &NAT4[..], &BACKEND4[..]),
                (true, &CLIENT6[..], &VIP6[..], &NAT6[..], &BACKEND6[..]),
            ] {
                for tcp in [false, true] {
                    // Request: client:40000 → VIP:80 becomes NAT:1024 → backend:8080.
                    let mut request = packet(v6, tcp, client, vip, 40000, 80, &payload);
                    translate(&mut request, v6, tcp, nat, backend, 1024, 8080);
                    assert_eq!(request, packet(v6, tcp, nat, backend, 1024, 8080, &payload), "v6={v6} tcp={tcp} {len}");
                    // Reply: backend:8080 → NAT:1024 becomes VIP:80 → client:40000.
                    let mut reply = packet(v6, tcp, backend, nat, 8080, 1024, &payload);
                    translate(&mut reply, v6, tcp, vip, client, 80, 40000);
                    assert_eq!(reply, packet(v6, tcp, vip, client, 80, 40000, &payload), "v6={v6} tcp={tcp} {len}");
                }
            }
        }
    }

    #[test]
    fn a_zero_udp_checksum_over_ipv4_stays_zero_and_a_computed_zero_is_sent_as_ffff() {
        let mut p = packet(false, false, &CLIENT4, &VIP4, 40000, 53, b"abc");
        p[IPV4_HLEN + 6..IPV4_HLEN + 8].copy_from_slice(&[0, 0]);
        translate(&mut p, false, false, &NAT4, &BACKEND4, 1024, 53);
        assert_eq!(&p[IPV4_HLEN + 6..IPV4_HLEN + 8], &[0, 0]);
        assert_eq!(&p[12..20], &[198, 18, 2, 1, 198, 18, 1, 11]);
        // 0xffff and 0 are the same one's-complement value: a result that
        // folds to 0 is written 0xffff.
        assert_eq!(replace_udp(0xffff, 0, 0, false), 0xffff);
        assert_eq!(replace(0xffff, 0, 0), 0);
        assert_eq!(replace_udp(0x1234, 0, 0, true), 0x1234);
    }

    #[test]
    fn the_kernels_ephemeral_range_is_left_out_of_the_pool() {
        // 1024-65535 without Linux's default 32768-60999.
        let (count, from, len) = pool_without(1024, 65535, Some((32768, 60999)));
        assert_eq!((count, from, len), (65535 - 1024 + 1 - (60999 - 32768 + 1), 32768, 60999 - 32768 + 1));
        let ports: BTreeSet<u16> = (0..count).map(|i| candidate_port(0, i, 1024, count, from, len)).collect();
        assert_eq!(ports.len() as u32, count);
        assert!(ports.iter().all(|p| (1024..32768).contains(p) || (61000..=65535).contains(p)));
        assert!(ports.contains(&1024) && ports.contains(&32767) && ports.contains(&61000) && ports.contains(&65535));
        // Exclusions beside, overlapping or covering the pool.
        assert_eq!(pool_without(40000, 40009, Some((32768, 39999))), (10, 0, 0));
        assert_eq!(pool_without(40000, 40009, Some((40005, 50000))), (5, 40005, 5));
        assert_eq!(pool_without(40000, 40009, Some((30000, 40001))), (8, 40000, 2));
        assert_eq!(pool_without(40000, 40009, Some((30000, 50000))), (10, 0, 0));
        assert_eq!(pool_without(40000, 40009, None), (10, 0, 0));
        let (count, from, len) = pool_without(40000, 40009, Some((30000, 40001)));
        let ports: Vec<u16> = (0..count).map(|i| candidate_port(0, i, 40000, count, from, len)).collect();
        assert_eq!(ports, (40002..=40009).collect::<Vec<_>>());
    }

    #[test]
    fn candidate_ports_cover_a_small_pool_and_stay_in_range() {
        for count in [1u32, 2, 5, 32] {
            for start in [0u32, 7, u32::MAX] {
                let ports: BTreeSet<u16> =
                    (0..attempts(count)).map(|a| candidate_port(start, a, 40000, count, 0, 0)).collect();
                assert_eq!(ports.len() as u32, count, "count {count} start {start}");
                assert!(ports.iter().all(|p| (40000..40000 + count as u16).contains(p)));
            }
        }
        // The default pool 1024-65535: in range, distinct per attempt.
        let count = 65535 - 1024 + 1;
        assert_eq!(attempts(count), NAT_PORT_ATTEMPTS);
        let ports: BTreeSet<u16> =
            (0..attempts(count)).map(|a| candidate_port(u32::MAX - 3, a, 1024, count, 0, 0)).collect();
        assert_eq!(ports.len() as u32, NAT_PORT_ATTEMPTS);
        assert!(ports.iter().all(|p| *p >= 1024));
    }

    #[test]
    fn a_translation_reads_as_handshake_then_live_then_finished_or_idle() {
        use crate::{NS_PER_SEC, PROTO_TCP};
        const NOW: u64 = 1000 * NS_PER_SEC;
        const UDP_IDLE: u64 = 30 * NS_PER_SEC;
        let at = |flags: u32, age: u64| NatFlow { flags, last_seen_ns: NOW - age, ..Default::default() };
        let phase = |flow: NatFlow, proto| flow.phase(NOW, proto, UDP_IDLE);
        assert_eq!(phase(at(0, SYN_RETRANSMIT_WINDOW_NS), PROTO_TCP), NatFlowPhase::Handshake { young: true });
        assert_eq!(phase(at(0, SYN_RETRANSMIT_WINDOW_NS + 1), PROTO_TCP), NatFlowPhase::Handshake { young: false });
        assert_eq!(phase(at(FLOW_F_FINISHED, 0), PROTO_TCP), NatFlowPhase::Aborted);
        assert_eq!(phase(at(NAT_FLOW_F_PINNED, 0), PROTO_TCP), NatFlowPhase::Live);
        // TCP flows never idle out here (the agent's scan expires them).
        assert_eq!(phase(at(NAT_FLOW_F_PINNED, 10 * UDP_IDLE), PROTO_TCP), NatFlowPhase::Live);
        assert_eq!(phase(at(NAT_FLOW_F_PINNED | FLOW_F_FINISHED, 0), PROTO_TCP), NatFlowPhase::Finished);
        assert_eq!(phase(at(NAT_FLOW_F_PINNED, UDP_IDLE), PROTO_UDP), NatFlowPhase::Live);
        assert_eq!(phase(at(NAT_FLOW_F_PINNED, UDP_IDLE + 1), PROTO_UDP), NatFlowPhase::Idle);
        // A clock read before the entry's own time (another CPU's): age 0.
        let ahead = NatFlow { flags: NAT_FLOW_F_PINNED, last_seen_ns: NOW + 5, ..Default::default() };
        assert_eq!(phase(ahead, PROTO_UDP), NatFlowPhase::Live);
    }
}
