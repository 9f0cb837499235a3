//! Whether a service's pinned flows follow its ring (`VIP_F_PINS_FOLLOW_RING`).
//!
//! A SYN looks its five-tuple up in the connection table so that a live
//! flow keeps its backend and a finished one is cleared for the new
//! connection. For a hash-scheduled service (maglev, source_hash,
//! least_response_time; no client affinity) the ring gives the same backend
//! to every packet of a five-tuple, so the lookup can only matter for a flow
//! pinned before the ring last changed, or adopted from a peer with another
//! ring. The agent's table scan checks every TCP entry against the ring;
//! once none strays, the flag tells the data plane's SYNs to skip the
//! lookup (on a full table it costs about a third of a SYN's path). A ring
//! change clears the flag before the new ring is written, and a peer's
//! flow that strays clears it before it is adopted.
//!
//! Each ring has a generation, bumped whenever it is written or a peer's
//! flow strays from it: a scan's verdict counts only for the generation it
//! was asked for.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use lb_common::{
    FINISHED_LINGER_NS, FLOW_F_FINISHED, FlowKey, FlowState, PROTO_TCP, VIP_F_NAT, VIP_F_PINS_FOLLOW_RING, VipInfo,
    VipKey, exact_port_or_wildcard, flow_hash, scheduler, source_hash,
};

use super::Reconciler;

/// One service's ring as a scan checks it.
#[derive(Clone, Debug)]
pub struct RingCheck {
    pub vip_id: u32,
    pub generation: u64,
    /// `scheduler::MAGLEV` or `scheduler::SOURCE_HASH`.
    pub scheduler: u32,
    /// The planner's record, shared: a scan every few seconds must not
    /// copy up to 16 MiB of rings.
    pub ring: Arc<Vec<u32>>,
}

/// Every service's VIP, with its ring where its SYNs could skip the
/// connection table (the flow's service is found as the data plane finds
/// it: the exact port, then the port-0 wildcard).
#[derive(Clone, Debug, Default)]
pub struct RingChecks {
    pub vips: HashMap<VipKey, Option<RingCheck>>,
}

impl RingChecks {
    /// The check of the service `key`'s packets reach, if it has one.
    fn of(&self, key: &FlowKey) -> Option<&RingCheck> {
        service_of(key, |vip| self.vips.get(vip))?.as_ref()
    }
}

/// What `find` finds for the service a flow's packets reach.
fn service_of<'a, T>(key: &FlowKey, find: impl Fn(&VipKey) -> Option<&'a T>) -> Option<&'a T> {
    exact_port_or_wildcard(key.dport, |port| {
        find(&VipKey { addr: key.dst, port, proto: key.proto, family: key.family })
    })
}

/// The backend the ring gives `key`, as the data plane's scheduler picks it.
pub fn ring_pick(check: &RingCheck, key: &FlowKey) -> u32 {
    let hash = if check.scheduler == scheduler::SOURCE_HASH { source_hash(&key.src) } else { flow_hash(key) };
    check.ring.get((hash % check.ring.len().max(1) as u32) as usize).copied().unwrap_or(lb_common::NO_BACKEND)
}

/// The (VIP id, ring generation) of each checked service none of whose TCP
/// pins strays from its ring. Read the half-open table before the
/// connection table: a handshake that completes between the two reads is
/// then seen in one of them. A finished flow idle past its linger is left
/// out: the data plane treats its entry as gone once the flag is set.
pub fn pins_following_ring<'a>(
    half_open: impl IntoIterator<Item = &'a (FlowKey, FlowState)>,
    conntrack: impl IntoIterator<Item = &'a (FlowKey, FlowState)>,
    checks: &RingChecks,
    now: u64,
) -> Vec<(u32, u64)> {
    let mut strays = HashSet::new();
    for (key, state) in half_open.into_iter().chain(conntrack) {
        if key.proto != PROTO_TCP {
            continue;
        }
        let finished = state.flags & FLOW_F_FINISHED != 0;
        if finished && now.saturating_sub(state.last_seen_ns) > FINISHED_LINGER_NS {
            continue;
        }
        if let Some(check) = checks.of(key)
            && ring_pick(check, key) != state.backend_id
        {
            strays.insert(check.vip_id);
        }
    }
    let mut following: Vec<(u32, u64)> = checks
        .vips
        .values()
        .flatten()
        .filter(|check| !strays.contains(&check.vip_id))
        .map(|check| (check.vip_id, check.generation))
        .collect();
    following.sort_unstable();
    following
}

/// Whether a service's SYNs may skip the connection table at all: a hash
/// scheduler, no client affinity (its picks depend on more than the
/// packet), not NAT (whose flows are pinned by their translations).
pub(super) fn may_follow(info: &VipInfo) -> bool {
    matches!(info.scheduler, scheduler::MAGLEV | scheduler::SOURCE_HASH)
        && info.persistence_timeout_ns == 0
        && info.flags & VIP_F_NAT == 0
}

impl Reconciler {
    /// A new generation for the ring of `vip_id`: it is being rewritten.
    pub(super) fn ring_rewritten(&mut self, vip_id: u32) {
        self.ring_generation += 1;
        self.ring_generations.insert(vip_id, self.ring_generation);
    }

    /// Whether the VIP's pins were found following its current ring.
    pub(super) fn pins_follow(&self, vip_id: u32) -> bool {
        let current = self.ring_generations.get(&vip_id);
        current.is_some() && self.pins_follow.get(&vip_id) == current
    }

    /// Whether the service's VIP entry, as last planned, lets its SYNs skip
    /// the connection table.
    pub fn syns_skip_conntrack(&self, service: &str) -> bool {
        let info = self.services.get(service).and_then(|s| s.info);
        info.is_some_and(|info| info.flags & VIP_F_PINS_FOLLOW_RING != 0)
    }

    /// What the next table scan checks the pins against.
    pub fn ring_checks(&self) -> RingChecks {
        let vips = self
            .services
            .values()
            .map(|service| {
                let check = service
                    .info
                    .filter(may_follow)
                    .zip(self.rings.get(&service.vip_id))
                    .zip(self.ring_generations.get(&service.vip_id))
                    .map(|((info, ring), generation)| RingCheck {
                        vip_id: service.vip_id,
                        generation: *generation,
                        scheduler: info.scheduler,
                        ring: Arc::clone(ring),
                    });
                (service.key, check)
            })
            .collect();
        RingChecks { vips }
    }

    /// A scan's verdict (`pins_following_ring`): the services it lists
    /// follow their rings at those generations, no other does. Whether
    /// that changes any service's flag (the next `plan` writes it).
    pub fn set_pins_follow(&mut self, following: &[(u32, u64)]) -> bool {
        let following: BTreeMap<u32, u64> = following.iter().copied().collect();
        let changed = self.services.values().any(|s| {
            let current = self.ring_generations.get(&s.vip_id);
            (self.pins_follow.get(&s.vip_id) == current) != (following.get(&s.vip_id) == current)
        });
        self.pins_follow = following;
        changed
    }

    /// Flows about to be pinned from outside the data plane (a peer's):
    /// a service one of them strays in no longer follows its ring, and
    /// the next `plan` clears its flag, which must be written before the
    /// flows are. Whether any service lost it.
    pub fn admit_pins(&mut self, pins: &[(FlowKey, u32)]) -> bool {
        // Cheap: the checks share the planner's rings.
        let checks = self.ring_checks();
        let mut lost = false;
        for (key, backend_id) in pins {
            if let Some(check) = checks.of(key)
                && self.pins_follow(check.vip_id)
                && ring_pick(check, key) != *backend_id
            {
                // A new generation, not just a forgotten verdict: a scan
                // already running (which cannot see this flow) would
                // otherwise set the flag again.
                self.ring_rewritten(check.vip_id);
                lost = true;
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use lb_common::NS_PER_SEC;

    use super::*;

    const NOW: u64 = 1_000 * NS_PER_SEC;

    fn vip(port: u16) -> VipKey {
        VipKey { addr: [0x6400_12c6, 0, 0, 0], port: port.to_be(), proto: PROTO_TCP, family: 4 }
    }

    fn flow(vip: VipKey, sport: u16) -> FlowKey {
        FlowKey {
            src: [0x0202_12c6, 0, 0, 0],
            dst: vip.addr,
            sport: sport.to_be(),
            dport: if vip.port == 0 { 8080u16.to_be() } else { vip.port },
            proto: vip.proto,
            family: 4,
            _pad: [0; 2],
        }
    }

    fn check(vip_id: u32, generation: u64, scheduler: u32) -> Option<RingCheck> {
        Some(RingCheck { vip_id, generation, scheduler, ring: Arc::new(vec![1, 2, 3, 4, 5, 6, 7]) })
    }

    fn checks() -> RingChecks {
        RingChecks {
            vips: [
                (vip(80), check(0, 5, scheduler::MAGLEV)),
                (vip(443), check(1, 9, scheduler::SOURCE_HASH)),
                (vip(22), None),
                (vip(0), check(2, 3, scheduler::MAGLEV)),
                (VipKey { proto: lb_common::PROTO_UDP, ..vip(53) }, check(3, 4, scheduler::MAGLEV)),
            ]
            .into_iter()
            .collect(),
        }
    }

    fn pinned(key: FlowKey, backend_id: u32, flags: u32, last_seen_ns: u64) -> (FlowKey, FlowState) {
        (key, FlowState { backend_id, flags, last_seen_ns })
    }

    /// An entry on its ring's pick for `vip`, or (`stray`) off it.
    fn entry(checks: &RingChecks, vip: VipKey, sport: u16, stray: bool) -> (FlowKey, FlowState) {
        let key = flow(vip, sport);
        let check = checks.of(&key).unwrap();
        let pick = ring_pick(check, &key);
        pinned(key, if stray { pick % 7 + 1 } else { pick }, 0, NOW)
    }

    fn web(weights: &[u32]) -> crate::state::DesiredService {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, weight)| crate::state::DesiredBackend {
                address: crate::config::BackendAddress::new(std::net::IpAddr::from([198, 18, 1, 11 + i as u8])),
                weight: *weight,
                path: Some(crate::netlink::L2Path {
                    ifindex: 7,
                    src_mac: [2, 0, 0, 0, 0, 1],
                    dst_mac: [2, 0, 0, 0, 1, i as u8],
                    mtu: 1500,
                    source: None,
                }),
                down: false,
            })
            .collect();
        crate::state::DesiredService::dsr(
            "web",
            "198.18.0.100:80".parse().unwrap(),
            crate::config::Protocol::Tcp,
            backends,
        )
    }

    /// The flags of every `SetVip` among `writes`, and where each sits
    /// against the first ring write.
    fn vip_writes(writes: &[super::super::MapWrite]) -> Vec<(u32, bool)> {
        let ring_at = writes.iter().position(|w| matches!(w, super::super::MapWrite::SetRingSlots { .. }));
        writes
            .iter()
            .enumerate()
            .filter_map(|(i, w)| match w {
                super::super::MapWrite::SetVip { info, .. } => Some((info.flags, ring_at.is_none_or(|r| i < r))),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_flag_follows_the_current_rings_verdict_and_is_cleared_before_the_ring_changes() {
        let mut r = Reconciler::new(251, 4);
        let (writes, _) = r.plan(&[web(&[1, 1, 1])]);
        assert_eq!(vip_writes(&writes), vec![(0, false)], "a new VIP after its ring, unflagged");
        let checks = r.ring_checks();
        let check = checks.vips.values().flatten().next().expect("maglev is checked").clone();

        // A verdict for the current ring sets the flag, written alone.
        assert!(r.set_pins_follow(&[(check.vip_id, check.generation)]));
        let (writes, _) = r.plan(&[web(&[1, 1, 1])]);
        assert_eq!(vip_writes(&writes), vec![(VIP_F_PINS_FOLLOW_RING, true)]);
        assert!(!r.set_pins_follow(&[(check.vip_id, check.generation)]), "the same verdict changes nothing");

        // A ring change clears it before the ring is written, and a
        // verdict on the old ring (a scan that ran across it) is stale.
        let (writes, _) = r.plan(&[web(&[1, 2, 1])]);
        assert_eq!(vip_writes(&writes), vec![(0, true)]);
        assert!(!r.set_pins_follow(&[(check.vip_id, check.generation)]));
        assert!(r.plan(&[web(&[1, 2, 1])]).0.is_empty());

        // A peer's flow on the ring's pick keeps the flag; a stray clears
        // it, and a scan already running cannot set it again.
        let check = r.ring_checks().vips.values().flatten().next().unwrap().clone();
        assert!(r.set_pins_follow(&[(check.vip_id, check.generation)]));
        r.plan(&[web(&[1, 2, 1])]);
        let key = flow(vip(80), 4242);
        let pick = ring_pick(&check, &key);
        assert!(!r.admit_pins(&[(key, pick)]));
        let elsewhere = *check.ring.iter().find(|id| **id != pick).expect("three backends");
        assert!(r.admit_pins(&[(key, pick), (key, elsewhere)]));
        let (writes, _) = r.plan(&[web(&[1, 2, 1])]);
        assert_eq!(vip_writes(&writes), vec![(0, true)]);
        assert!(!r.set_pins_follow(&[(check.vip_id, check.generation)]));

        // An unflagging write the kernel refused leaves the entry unknown:
        // the retry still clears the flag before the ring changes.
        let check = r.ring_checks().vips.values().flatten().next().unwrap().clone();
        assert!(r.set_pins_follow(&[(check.vip_id, check.generation)]));
        r.plan(&[web(&[1, 2, 1])]);
        let (writes, _) = r.plan(&[web(&[3, 2, 1])]);
        assert_eq!(vip_writes(&writes), vec![(0, true)]);
        for write in &writes {
            r.forget(write);
        }
        let (writes, _) = r.plan(&[web(&[3, 2, 1])]);
        assert_eq!(vip_writes(&writes), vec![(0, true)]);

        // Not for a service whose picks depend on more than the ring.
        let mut sticky = web(&[1, 1, 1]);
        sticky.persistence_timeout_s = 60;
        r.plan(&[sticky]);
        assert!(r.ring_checks().vips.values().all(Option::is_none));
    }

    #[test]
    fn a_service_follows_its_ring_until_one_tcp_pin_strays() {
        let checks = checks();
        let all = vec![(0, 5), (1, 9), (2, 3), (3, 4)];
        let on_ring: Vec<_> = (0..50).map(|p| entry(&checks, vip(80), 1000 + p, false)).collect();
        assert_eq!(pins_following_ring(&[], &on_ring, &checks, NOW), all);

        // One stray in either table; the wildcard service is found by port 0.
        let stray = [entry(&checks, vip(80), 7, true)];
        assert_eq!(pins_following_ring(&stray, &on_ring, &checks, NOW), vec![(1, 9), (2, 3), (3, 4)]);
        assert_eq!(pins_following_ring(&[], &stray, &checks, NOW), vec![(1, 9), (2, 3), (3, 4)]);
        let wildcard = [entry(&checks, vip(0), 7, true)];
        assert_eq!(pins_following_ring(&[], &wildcard, &checks, NOW), vec![(0, 5), (1, 9), (3, 4)]);

        // source_hash picks by the client's address alone.
        let sh = entry(&checks, vip(443), 1, false);
        let same_client = pinned(flow(vip(443), 2), sh.1.backend_id, 0, NOW);
        assert_eq!(pins_following_ring(&[], &[sh, same_client], &checks, NOW), all);

        // UDP pins (SYNs are TCP's), services without a check, and finished
        // flows past their linger do not count.
        let udp = entry(&checks, VipKey { proto: lb_common::PROTO_UDP, ..vip(53) }, 8, true);
        let unchecked = pinned(flow(vip(22), 9), 99, 0, NOW);
        let mut gone = entry(&checks, vip(80), 10, true);
        gone.1 = FlowState { flags: FLOW_F_FINISHED, last_seen_ns: NOW - FINISHED_LINGER_NS - 1, ..gone.1 };
        assert_eq!(pins_following_ring(&[], &[udp, unchecked, gone], &checks, NOW), all);
        // ... but a finished flow within its linger does.
        gone.1.last_seen_ns = NOW - NS_PER_SEC;
        assert_eq!(pins_following_ring(&[], &[gone], &checks, NOW), vec![(1, 9), (2, 3), (3, 4)]);
    }
}
