//! One service's writes: its backend slots, its ring or sequence, its VIP
//! entry, in the order that keeps the data plane consistent; and its removal.

use std::collections::BTreeMap;

use lb_common::{LeastConnCandidates, VIP_F_NAT, VIP_F_NAT_FLOWS_LINGER, VIP_F_PINS_FOLLOW_RING, VipInfo, scheduler};

use super::*;

impl Reconciler {
    pub(super) fn update_service(
        &mut self,
        desired: &DesiredService,
        writes: &mut Vec<MapWrite>,
    ) -> Result<(), ReconcileError> {
        let is_new = !self.services.contains_key(&desired.name);
        if is_new {
            let vip_id = self.free_vip_ids.pop().ok_or_else(|| ReconcileError::OutOfVipIds(desired.name.clone()))?;
            self.services.insert(
                desired.name.clone(),
                AppliedService {
                    vip_id,
                    key: vip_key(desired),
                    info: None,
                    backends: BTreeMap::new(),
                    nat: None,
                    candidates: None,
                },
            );
        }
        let mut result = Ok(());

        // Backends: keep ids of those that stay, retire those that left.
        let mut service = self.services.remove(&desired.name).expect("inserted above");
        let resolved: BTreeMap<BackendAddress, &DesiredBackend> =
            desired.backends.iter().filter(|b| b.path.is_some()).map(|b| (b.address, b)).collect();
        let left: Vec<BackendAddress> =
            service.backends.keys().filter(|a| !resolved.contains_key(a)).copied().collect();
        let mut retiring = Vec::new();
        for address in left {
            retiring.push(service.backends.remove(&address).expect("listed above"));
        }
        let mut members = Vec::new();
        // After the egress devices they use, one run: the writer sends a
        // run of backends to the kernel in one call.
        let mut backend_writes = Vec::new();
        let mode = desired.forwarding.mode();
        for (address, backend) in &resolved {
            // A service that turns NAT on or off gives its backends new
            // slots and retires the old ones: a flow pinned to an old slot
            // goes on as it was carried until it ends (switched in place, a
            // connection would change addresses mid-way and break). DSR and
            // the tunnels switch in place: the backend sees the same packet.
            if let Some(id) = service.backends.get(address).copied()
                && self.backends.get(&id).is_some_and(|slot| (slot.forwarding == NAT) != (mode == NAT))
            {
                service.backends.remove(address);
                retiring.push(id);
            }
            let id = match service.backends.get(address) {
                Some(id) => *id,
                None => match self.free_backend_ids.pop() {
                    Some(id) => {
                        service.backends.insert(*address, id);
                        id
                    }
                    None => {
                        result = Err(ReconcileError::OutOfBackendIds(desired.name.clone(), *address));
                        continue;
                    }
                },
            };
            let path = backend.path.expect("filtered on resolved");
            if self.egress_devices.insert(path.ifindex) {
                writes.push(MapWrite::AddEgressDevice { ifindex: path.ifindex });
            }
            let slot = backend_slot(*address, path, backend, desired, service.vip_id);
            if self.backends.get(&id) != Some(&slot) {
                self.backends.insert(id, slot);
                backend_writes.push(MapWrite::SetBackend { id, backend: slot });
            }
            members.push(MaglevBackend {
                id,
                identity: maglev::stable_hash(&backend_identity(*address)),
                weight: backend.weight,
            });
        }
        writes.append(&mut backend_writes);
        self.retired.extend(retiring);

        // The translation settings before anything can reach the VIP.
        let pool = desired.nat.as_ref().map(nat_pool);
        if let Some(pool) = pool
            && service.nat != Some(pool)
        {
            writes.push(MapWrite::SetNatPool { vip_id: service.vip_id, pool });
        }
        service.nat = pool;

        let (ring, mut info, candidates) = self.scheduler_state(desired, service.vip_id, &members);
        let size = self.ring_size as usize;
        let recorded = self.rings.entry(service.vip_id).or_insert_with(|| Arc::new(vec![lb_common::NO_BACKEND; size]));
        let slots: Vec<(u32, u32)> = ring
            .iter()
            .zip(recorded.iter())
            .enumerate()
            .filter(|(_, (new, old))| new != old)
            .map(|(i, (new, _))| (i as u32, *new))
            .collect();
        if **recorded != ring {
            // A new allocation: a scan may still hold the old record.
            *recorded = Arc::new(ring);
        }
        if !slots.is_empty() || !self.ring_generations.contains_key(&service.vip_id) {
            self.ring_rewritten(service.vip_id);
        }
        if follow::may_follow(&info) && self.pins_follow(service.vip_id) {
            info.flags |= VIP_F_PINS_FOLLOW_RING;
        }
        if info.flags & VIP_F_NAT == 0 && self.nat_flows_linger(service.vip_id) {
            info.flags |= VIP_F_NAT_FLOWS_LINGER;
        }
        // A shorter sequence is announced before its tail is cleared, a
        // longer one after it is written: the cursor never reads a hole.
        // SYNs look at the connection table again before the ring changes.
        let info_changed = service.info != Some(info);
        let shrinking = service.info.is_some_and(|old| old.seq_len > info.seq_len);
        let unflagging = info.flags & VIP_F_PINS_FOLLOW_RING == 0 && self.maybe_flagged.contains(&service.vip_id);
        if info_changed && (shrinking || unflagging) {
            writes.push(MapWrite::SetVip { key: service.key, info });
        }
        if unflagging {
            self.unflag_planned.insert(service.vip_id);
        }
        if info.flags & VIP_F_PINS_FOLLOW_RING != 0 {
            self.maybe_flagged.insert(service.vip_id);
        }
        if !slots.is_empty() {
            writes.push(MapWrite::SetRingSlots { vip_id: service.vip_id, slots });
        }
        // With the ring: the data plane reads the first `seq_len`.
        if let Some(candidates) = candidates
            && service.candidates != Some(candidates)
        {
            writes.push(MapWrite::SetLeastConnCandidates { vip_id: service.vip_id, candidates });
        }
        service.candidates = candidates;

        if info_changed && !(shrinking || unflagging) {
            writes.push(MapWrite::SetVip { key: service.key, info });
        }
        service.info = Some(info);
        self.services.insert(desired.name.clone(), service);
        result
    }

    /// What the VIP's slot region holds, its `VIPS` entry, and (least_conn)
    /// its `LEAST_CONN_CANDIDATES` entry, by scheduler.
    pub(super) fn scheduler_state(
        &self,
        desired: &DesiredService,
        vip_id: u32,
        members: &[MaglevBackend],
    ) -> (Vec<u32>, VipInfo, Option<LeastConnCandidates>) {
        let weighted: Vec<(u32, u64, u32)> = members.iter().map(|m| (m.id, m.identity, m.weight)).collect();
        let unweighted: Vec<(u32, u64, u32)> = weighted.iter().map(|(id, i, w)| (*id, *i, (*w > 0) as u32)).collect();
        let (kind, list, candidates) = match desired.scheduler {
            Scheduler::Maglev | Scheduler::LeastResponseTime => (scheduler::MAGLEV, None, None),
            Scheduler::Random => (scheduler::RANDOM, None, None),
            Scheduler::SourceHash => (scheduler::SOURCE_HASH, None, None),
            Scheduler::RoundRobin => {
                (scheduler::SEQUENCE, Some(scheduling::smooth_sequence(&unweighted, self.ring_size as usize)), None)
            }
            Scheduler::WeightedRoundRobin => {
                (scheduler::SEQUENCE, Some(scheduling::smooth_sequence(&weighted, self.ring_size as usize)), None)
            }
            Scheduler::LeastConn => {
                // The ring's first slots name the candidates too, for an
                // older release's program during an upgrade.
                let candidates = scheduling::least_conn_candidates(&weighted);
                let ids = candidates.iter().map(|(id, _)| *id).collect();
                (scheduler::LEAST_CONN, Some(ids), Some(scheduling::least_conn_block(&candidates)))
            }
        };
        let (ring, seq_len) = match list {
            None => (maglev::build_table(members, self.ring_size), 0),
            Some(list) => {
                let mut ring = vec![lb_common::NO_BACKEND; self.ring_size as usize];
                ring[..list.len()].copy_from_slice(&list);
                (ring, list.len() as u32)
            }
        };
        let info = VipInfo {
            id: vip_id,
            // A NAT service's established packets find their backend in the
            // translation (`NAT_FLOWS`) before the connection table.
            flags: if desired.forwarding.mode() == NAT { VIP_F_NAT } else { 0 },
            scheduler: kind,
            seq_len,
            persistence_timeout_ns: desired.persistence_timeout_s as u64 * lb_common::NS_PER_SEC,
        };
        (ring, info, candidates)
    }

    /// Whether a retired NAT slot of `vip_id` may still carry flows, which
    /// their translations pin (`VIP_F_NAT_FLOWS_LINGER`).
    pub(super) fn nat_flows_linger(&self, vip_id: u32) -> bool {
        self.retired_nat_slots().any(|slot| slot.vip_id == vip_id)
    }

    pub(super) fn remove_service(&mut self, name: &str, writes: &mut Vec<MapWrite>) {
        let Some(service) = self.services.remove(name) else {
            return;
        };
        writes.push(MapWrite::RemoveVip { key: service.key });
        self.clear_ring(service.vip_id, writes);
        self.free_vip_ids.push(service.vip_id);
        self.retired.extend(service.backends.into_values());
    }

    /// Empties the ring of a VIP id no service uses any more.
    pub(super) fn clear_ring(&mut self, vip_id: u32, writes: &mut Vec<MapWrite>) {
        self.ring_generations.remove(&vip_id);
        self.pins_follow.remove(&vip_id);
        self.maybe_flagged.remove(&vip_id);
        let ring = self.rings.remove(&vip_id).unwrap_or_default();
        let slots: Vec<(u32, u32)> = ring
            .iter()
            .enumerate()
            .filter(|(_, id)| **id != lb_common::NO_BACKEND)
            .map(|(i, _)| (i as u32, lb_common::NO_BACKEND))
            .collect();
        if !slots.is_empty() {
            writes.push(MapWrite::SetRingSlots { vip_id, slots });
        }
    }
}
