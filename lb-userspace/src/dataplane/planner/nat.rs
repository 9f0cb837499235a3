//! The NAT tables' upkeep, from a scan of both: translations of ended flows
//! are removed, which returns their source ports to the pool. Pure: the
//! scan and the clock come in, map writes go out (to the one writer).
//!
//! A flow has ended when it has been silent (in both directions) for its
//! idle timeout, or, after a FIN or RST, for the linger that lets its last
//! ACKs through. The flow's entry goes before its reply entry: while the
//! reply entry exists its port cannot be taken, so no second flow can get
//! the translation of one that still has an entry.

use std::collections::HashMap;

use lb_common::{FLOW_F_FINISHED, FlowKey, NatFlow, NatReply, PROTO_UDP};

use super::MapWrite;

/// How long NAT translations outlive their traffic, in nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct NatTimeouts {
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
    pub fin_linger_ns: u64,
}

/// A reply entry whose flow entry is missing or points elsewhere is kept
/// this long after its last packet: the data plane writes the reply entry
/// of a new translation just before the flow entry.
pub const ORPHAN_GRACE_NS: u64 = 2 * lb_common::NS_PER_SEC;

/// What a scan of the NAT tables found and what it removes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NatUpkeep {
    pub writes: Vec<MapWrite>,
    /// Live (unexpired) translations per backend id: ports in use.
    pub translations: HashMap<u32, u64>,
    /// Of those, flows not finished: active NAT flows.
    pub active: HashMap<u32, u64>,
}

/// The client's five-tuple a reply entry translates back to.
pub fn flow_key_of(reply_key: &FlowKey, reply: &NatReply) -> FlowKey {
    FlowKey {
        src: reply.client,
        dst: reply.vip,
        sport: reply.client_port,
        dport: reply.vip_port,
        proto: reply_key.proto,
        family: reply_key.family,
        _pad: [0; 2],
    }
}

pub fn nat_upkeep(
    flows: &[(FlowKey, NatFlow)],
    replies: &[(FlowKey, NatReply)],
    now: u64,
    timeouts: &NatTimeouts,
) -> NatUpkeep {
    let flows: HashMap<FlowKey, NatFlow> = flows.iter().copied().collect();
    let mut upkeep = NatUpkeep::default();
    let mut paired = std::collections::HashSet::new();
    for (reply_key, reply) in replies {
        let flow_key = flow_key_of(reply_key, reply);
        let flow = flows.get(&flow_key).filter(|f| {
            f.backend_id == reply.backend_id && f.nat_addr == reply_key.dst && f.nat_port == reply_key.dport
        });
        let Some(flow) = flow else {
            if now.saturating_sub(reply.last_seen_ns) > ORPHAN_GRACE_NS {
                upkeep.writes.push(MapWrite::RemoveNatReply { key: *reply_key });
            }
            continue;
        };
        paired.insert(flow_key);
        let last = flow.last_seen_ns.max(reply.last_seen_ns);
        let finished = (flow.flags | reply.flags) & FLOW_F_FINISHED != 0;
        let timeout = if reply_key.proto == PROTO_UDP {
            timeouts.udp_idle_ns
        } else if finished {
            timeouts.fin_linger_ns
        } else {
            timeouts.tcp_idle_ns
        };
        if now.saturating_sub(last) > timeout {
            upkeep.writes.push(MapWrite::RemoveNatFlow { key: flow_key });
            upkeep.writes.push(MapWrite::RemoveNatReply { key: *reply_key });
            continue;
        }
        *upkeep.translations.entry(reply.backend_id).or_default() += 1;
        if !finished {
            *upkeep.active.entry(reply.backend_id).or_default() += 1;
        }
    }
    // Flow entries without their reply entry (a failed insert's leftovers).
    for (key, flow) in &flows {
        if !paired.contains(key) && now.saturating_sub(flow.last_seen_ns) > ORPHAN_GRACE_NS {
            upkeep.writes.push(MapWrite::RemoveNatFlow { key: *key });
        }
    }
    upkeep
}

#[cfg(test)]
mod tests {
    use lb_common::{FAMILY_IPV4, NS_PER_SEC, PROTO_TCP};

    use super::*;

    const TIMEOUTS: NatTimeouts =
        NatTimeouts { tcp_idle_ns: 900 * NS_PER_SEC, udp_idle_ns: 30 * NS_PER_SEC, fin_linger_ns: 10 * NS_PER_SEC };

    fn word(a: [u8; 4]) -> [u32; 4] {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    /// A translation: client port → NAT port 40000 + n to backend id 1.
    fn translation(n: u16, proto: u8, last_seen: u64, flags: u32) -> ((FlowKey, NatFlow), (FlowKey, NatReply)) {
        let flow_key = FlowKey {
            src: word([198, 18, 0, 2]),
            dst: word([198, 18, 0, 100]),
            sport: (1000 + n).to_be(),
            dport: 80u16.to_be(),
            proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        let nat_port = (40000 + n).to_be();
        let reply_key = lb_common::nat::reply_key(
            &flow_key,
            word([198, 18, 1, 11]),
            8080u16.to_be(),
            word([198, 18, 1, 1]),
            nat_port,
        );
        let flow = NatFlow {
            nat_addr: reply_key.dst,
            nat_port,
            backend_id: 1,
            flags,
            last_seen_ns: last_seen,
            ..Default::default()
        };
        let reply = NatReply {
            client: flow_key.src,
            vip: flow_key.dst,
            client_port: flow_key.sport,
            vip_port: flow_key.dport,
            backend_id: 1,
            vip_id: 0,
            flags: 0,
            last_seen_ns: last_seen,
        };
        ((flow_key, flow), (reply_key, reply))
    }

    #[test]
    fn ended_flows_lose_their_translation_flow_entry_first() {
        let now = 10_000 * NS_PER_SEC;
        let cases = [
            (PROTO_TCP, now - 899 * NS_PER_SEC, 0, false),             // busy enough
            (PROTO_TCP, now - 901 * NS_PER_SEC, 0, true),              // idle past tcp_idle
            (PROTO_TCP, now - 9 * NS_PER_SEC, FLOW_F_FINISHED, false), // lingering
            (PROTO_TCP, now - 11 * NS_PER_SEC, FLOW_F_FINISHED, true), // linger over
            (PROTO_UDP, now - 31 * NS_PER_SEC, 0, true),
            (PROTO_UDP, now - 29 * NS_PER_SEC, 0, false),
        ];
        for (n, (proto, last_seen, flags, ends)) in cases.into_iter().enumerate() {
            let ((fk, f), (rk, r)) = translation(n as u16, proto, last_seen, flags);
            let upkeep = nat_upkeep(&[(fk, f)], &[(rk, r)], now, &TIMEOUTS);
            if ends {
                assert_eq!(
                    upkeep.writes,
                    [MapWrite::RemoveNatFlow { key: fk }, MapWrite::RemoveNatReply { key: rk }],
                    "case {n}"
                );
                assert!(upkeep.translations.is_empty(), "case {n}");
            } else {
                assert!(upkeep.writes.is_empty(), "case {n}: {:?}", upkeep.writes);
                assert_eq!(upkeep.translations[&1], 1, "case {n}");
                assert_eq!(upkeep.active.get(&1).copied().unwrap_or(0), (flags == 0) as u64, "case {n}");
            }
        }
    }

    #[test]
    fn the_later_of_both_directions_keeps_a_flow_alive() {
        let now = 10_000 * NS_PER_SEC;
        let ((fk, f), (rk, mut r)) = translation(1, PROTO_UDP, now - 100 * NS_PER_SEC, 0);
        r.last_seen_ns = now - NS_PER_SEC; // the backend still talks
        assert!(nat_upkeep(&[(fk, f)], &[(rk, r)], now, &TIMEOUTS).writes.is_empty());
        // A FIN seen on the reply side counts too.
        let ((fk, f), (rk, mut r)) = translation(2, PROTO_TCP, now - 20 * NS_PER_SEC, 0);
        r.flags = FLOW_F_FINISHED;
        assert_eq!(nat_upkeep(&[(fk, f)], &[(rk, r)], now, &TIMEOUTS).writes.len(), 2);
    }

    #[test]
    fn orphans_go_after_a_grace_period_and_not_before() {
        let now = 10_000 * NS_PER_SEC;
        // A reply entry whose flow was rescheduled to another port (or backend).
        let ((fk, mut f), (rk, r)) = translation(1, PROTO_TCP, now - 3 * NS_PER_SEC, 0);
        f.nat_port = 41234u16.to_be();
        let upkeep = nat_upkeep(&[(fk, f)], &[(rk, r)], now, &TIMEOUTS);
        assert_eq!(upkeep.writes, [MapWrite::RemoveNatReply { key: rk }, MapWrite::RemoveNatFlow { key: fk }]);
        // Just written by the data plane (flow entry not there yet): kept.
        let ((_, _), (rk, r)) = translation(2, PROTO_TCP, now - NS_PER_SEC, 0);
        assert!(nat_upkeep(&[], &[(rk, r)], now, &TIMEOUTS).writes.is_empty());
    }
}
