//! The one step that turns the agent's desired state into map writes.
//!
//! `Reconciler` remembers what it has written (ids, rings, backends) and
//! computes the writes that take the maps from there to a new desired state.
//! It performs no I/O; `Dataplane::apply` executes the writes in order.
//!
//! Order of writes keeps the data plane consistent at every step: egress
//! devices and backend slots before the ring slots that point at them, rings
//! before the VIP entry that makes them reachable; on removal the reverse.
//! A backend that leaves a service is *retired*: its slot stays valid so
//! pinned flows keep flowing, and its id is freed only once no
//! connection-table entry refers to it (`collect_retired`).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    BACKEND_F_DOWN, BACKEND_F_IN_USE, Backend, FAMILY_IPV4, FAMILY_IPV6, MAX_BACKENDS,
    VipAddressKey, VipInfo, VipKey,
};

use crate::{
    config::Protocol,
    dataplane::MapsState,
    maglev::{self, MaglevBackend},
    netlink::L2Path,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub backends: Vec<DesiredBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub address: IpAddr,
    pub weight: u32,
    /// `None` until the neighbour is resolved; such a backend gets no slot.
    pub path: Option<L2Path>,
    /// Failed health checks: the data plane reschedules its pinned flows.
    pub down: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapWrite {
    AddEgressDevice { ifindex: u32 },
    SetBackend { id: u32, backend: Backend },
    ClearBackend { id: u32 },
    SetRingSlots { vip_id: u32, slots: Vec<(u32, u32)> },
    SetVip { key: VipKey, info: VipInfo },
    RemoveVip { key: VipKey },
    AddVipAddress { key: VipAddressKey },
    RemoveVipAddress { key: VipAddressKey },
}

#[derive(Debug)]
struct AppliedService {
    vip_id: u32,
    key: VipKey,
    ring: Vec<u32>,
    /// Backend address → slot id, for the backends currently in the service.
    backends: BTreeMap<IpAddr, u32>,
}

#[derive(Debug)]
pub struct Reconciler {
    ring_size: u32,
    services: BTreeMap<String, AppliedService>,
    backends: BTreeMap<u32, Backend>,
    retired: BTreeSet<u32>,
    free_vip_ids: Vec<u32>,
    free_backend_ids: Vec<u32>,
    egress_devices: BTreeSet<u32>,
    vip_addresses: BTreeMap<VipAddressKey, u32>,
}

/// Why a desired state could not be applied in full.
#[derive(Debug, PartialEq, Eq)]
pub enum ReconcileError {
    OutOfVipIds(String),
    OutOfBackendIds(String, IpAddr),
}

impl std::fmt::Display for ReconcileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReconcileError::OutOfVipIds(s) => {
                write!(f, "service {s:?}: no free VIP slot (raise max_services)")
            }
            ReconcileError::OutOfBackendIds(s, a) => {
                write!(f, "service {s:?}: no free backend slot for {a}")
            }
        }
    }
}

impl Reconciler {
    pub fn new(ring_size: u32, max_services: u32) -> Self {
        Self {
            ring_size,
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            retired: BTreeSet::new(),
            // Popped from the end: lowest ids first.
            free_vip_ids: (0..max_services).rev().collect(),
            free_backend_ids: (1..MAX_BACKENDS).rev().collect(),
            egress_devices: BTreeSet::new(),
            vip_addresses: BTreeMap::new(),
        }
    }

    /// Takes over the state a previous agent left in pinned maps: VIP ids,
    /// backend slots (which flows in the connection table point at) and ring
    /// contents. VIPs are matched to `services` by (address, port,
    /// protocol); a VIP no service claims is removed by the next `plan`, and
    /// a slot no service claims is retired.
    pub fn adopt(
        ring_size: u32,
        max_services: u32,
        maps: &MapsState,
        services: &[(String, VipKey)],
    ) -> Self {
        let mut r = Self::new(ring_size, max_services);
        for (key, info) in &maps.vips {
            let name = services
                .iter()
                .find(|(_, k)| k == key)
                .map(|(name, _)| name.clone())
                .unwrap_or_else(|| format!("<unconfigured VIP {}>", info.id));
            let ring = maps
                .rings
                .get(&info.id)
                .cloned()
                .unwrap_or_else(|| vec![lb_common::NO_BACKEND; ring_size as usize]);
            r.free_vip_ids.retain(|id| *id != info.id);
            *r.vip_addresses.entry(vip_address_key(key)).or_insert(0) += 1;
            r.services.insert(
                name,
                AppliedService {
                    vip_id: info.id,
                    key: *key,
                    ring,
                    backends: BTreeMap::new(),
                },
            );
        }
        for (id, backend) in &maps.backends {
            r.free_backend_ids.retain(|free| free != id);
            r.backends.insert(*id, *backend);
            let address = words_address(backend.addr, backend.family);
            let owner = r.services.values_mut().find(|s| s.vip_id == backend.vip_id);
            match owner {
                Some(service) if !service.backends.contains_key(&address) => {
                    service.backends.insert(address, *id);
                }
                _ => {
                    r.retired.insert(*id);
                }
            }
        }
        r.egress_devices.extend(maps.egress_devices.iter().copied());
        r
    }

    /// Ids of backends that left their service but may still have flows.
    pub fn retired(&self) -> &BTreeSet<u32> {
        &self.retired
    }

    /// The slot id of a backend of a service, if it has one.
    pub fn backend_id(&self, service: &str, address: IpAddr) -> Option<u32> {
        self.services.get(service)?.backends.get(&address).copied()
    }

    pub fn vip_id(&self, service: &str) -> Option<u32> {
        self.services.get(service).map(|s| s.vip_id)
    }

    /// Writes that take the maps to `desired`. Services or backends that do
    /// not fit are reported and left out; everything else is applied.
    pub fn plan(&mut self, desired: &[DesiredService]) -> (Vec<MapWrite>, Vec<ReconcileError>) {
        let mut writes = Vec::new();
        let mut errors = Vec::new();
        let wanted: HashSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();

        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !wanted.contains(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(&name, &mut writes);
        }
        for service in desired {
            if let Some(applied) = self.services.get(&service.name)
                && applied.key != vip_key(service)
            {
                // Same name, new VIP: a different service as far as the data plane goes.
                self.remove_service(&service.name, &mut writes);
            }
            if let Err(e) = self.update_service(service, &mut writes) {
                errors.push(e);
            }
        }
        (writes, errors)
    }

    fn update_service(
        &mut self,
        desired: &DesiredService,
        writes: &mut Vec<MapWrite>,
    ) -> Result<(), ReconcileError> {
        let is_new = !self.services.contains_key(&desired.name);
        if is_new {
            let vip_id = self
                .free_vip_ids
                .pop()
                .ok_or_else(|| ReconcileError::OutOfVipIds(desired.name.clone()))?;
            self.services.insert(
                desired.name.clone(),
                AppliedService {
                    vip_id,
                    key: vip_key(desired),
                    ring: vec![lb_common::NO_BACKEND; self.ring_size as usize],
                    backends: BTreeMap::new(),
                },
            );
        }
        let mut result = Ok(());

        // Backends: keep ids of those that stay, retire those that left.
        let mut service = self.services.remove(&desired.name).expect("inserted above");
        let resolved: BTreeMap<IpAddr, &DesiredBackend> = desired
            .backends
            .iter()
            .filter(|b| b.path.is_some())
            .map(|b| (b.address, b))
            .collect();
        let left: Vec<IpAddr> = service
            .backends
            .keys()
            .filter(|a| !resolved.contains_key(a))
            .copied()
            .collect();
        let mut retiring = Vec::new();
        for address in left {
            retiring.push(service.backends.remove(&address).expect("listed above"));
        }
        let mut members = Vec::new();
        for (address, backend) in &resolved {
            let id = match service.backends.get(address) {
                Some(id) => *id,
                None => match self.free_backend_ids.pop() {
                    Some(id) => {
                        service.backends.insert(*address, id);
                        id
                    }
                    None => {
                        result = Err(ReconcileError::OutOfBackendIds(
                            desired.name.clone(),
                            *address,
                        ));
                        continue;
                    }
                },
            };
            let path = backend.path.expect("filtered on resolved");
            if self.egress_devices.insert(path.ifindex) {
                writes.push(MapWrite::AddEgressDevice {
                    ifindex: path.ifindex,
                });
            }
            let slot = backend_slot(*address, path, backend.down, service.vip_id);
            if self.backends.get(&id) != Some(&slot) {
                self.backends.insert(id, slot);
                writes.push(MapWrite::SetBackend { id, backend: slot });
            }
            members.push(MaglevBackend {
                id,
                identity: maglev::stable_hash(&address_bytes(*address)),
                weight: backend.weight,
            });
        }

        let ring = maglev::build_table(&members, self.ring_size);
        let slots: Vec<(u32, u32)> = ring
            .iter()
            .zip(&service.ring)
            .enumerate()
            .filter(|(_, (new, old))| new != old)
            .map(|(i, (new, _))| (i as u32, *new))
            .collect();
        if !slots.is_empty() {
            writes.push(MapWrite::SetRingSlots {
                vip_id: service.vip_id,
                slots,
            });
        }
        service.ring = ring;

        if is_new {
            writes.push(MapWrite::SetVip {
                key: service.key,
                info: VipInfo {
                    id: service.vip_id,
                    flags: 0,
                },
            });
            let address = vip_address_key(&service.key);
            let count = self.vip_addresses.entry(address).or_insert(0);
            *count += 1;
            if *count == 1 {
                writes.push(MapWrite::AddVipAddress { key: address });
            }
        }
        self.retired.extend(retiring);
        self.services.insert(desired.name.clone(), service);
        result
    }

    fn remove_service(&mut self, name: &str, writes: &mut Vec<MapWrite>) {
        let Some(service) = self.services.remove(name) else {
            return;
        };
        writes.push(MapWrite::RemoveVip { key: service.key });
        let address = vip_address_key(&service.key);
        if let Some(count) = self.vip_addresses.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                self.vip_addresses.remove(&address);
                writes.push(MapWrite::RemoveVipAddress { key: address });
            }
        }
        let slots: Vec<(u32, u32)> = service
            .ring
            .iter()
            .enumerate()
            .filter(|(_, id)| **id != lb_common::NO_BACKEND)
            .map(|(i, _)| (i as u32, lb_common::NO_BACKEND))
            .collect();
        if !slots.is_empty() {
            writes.push(MapWrite::SetRingSlots {
                vip_id: service.vip_id,
                slots,
            });
        }
        self.free_vip_ids.push(service.vip_id);
        self.retired.extend(service.backends.into_values());
    }

    /// Frees retired backend slots that no connection-table entry refers to.
    pub fn collect_retired(&mut self, referenced: &HashSet<u32>) -> Vec<MapWrite> {
        let free: Vec<u32> = self
            .retired
            .iter()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        let mut writes = Vec::new();
        for id in free {
            self.retired.remove(&id);
            self.backends.remove(&id);
            self.free_backend_ids.push(id);
            writes.push(MapWrite::ClearBackend { id });
        }
        writes
    }
}

pub fn vip_key(service: &DesiredService) -> VipKey {
    VipKey {
        addr: address_words(service.vip.ip()),
        port: service.vip.port().to_be(),
        proto: service.protocol.number(),
        family: family(service.vip.ip()),
    }
}

/// The VIP key of a configured service.
pub fn vip_key_of(service: &crate::config::ServiceConfig) -> VipKey {
    let vip = *service.vip.get_ref();
    VipKey {
        addr: address_words(vip.ip()),
        port: vip.port().to_be(),
        proto: service.protocol.number(),
        family: family(vip.ip()),
    }
}

fn vip_address_key(key: &VipKey) -> VipAddressKey {
    VipAddressKey {
        addr: key.addr,
        family: key.family,
        _pad: [0; 3],
    }
}

fn backend_slot(address: IpAddr, path: L2Path, down: bool, vip_id: u32) -> Backend {
    Backend {
        addr: address_words(address),
        family: family(address),
        flags: BACKEND_F_IN_USE | if down { BACKEND_F_DOWN } else { 0 },
        _pad: [0; 2],
        ifindex: path.ifindex,
        dst_mac: path.dst_mac,
        src_mac: path.src_mac,
        vip_id,
    }
}

fn words_address(words: [u32; 4], family: u8) -> IpAddr {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if family == FAMILY_IPV4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes"))
    }
}

pub fn family(address: IpAddr) -> u8 {
    if address.is_ipv4() {
        FAMILY_IPV4
    } else {
        FAMILY_IPV6
    }
}

/// Address as stored in maps: wire bytes, IPv4 in the first word.
pub fn address_words(address: IpAddr) -> [u32; 4] {
    let mut words = [0u32; 4];
    match address {
        IpAddr::V4(v4) => words[0] = u32::from_ne_bytes(v4.octets()),
        IpAddr::V6(v6) => {
            for (word, chunk) in words.iter_mut().zip(v6.octets().chunks_exact(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
    }
    words
}

fn address_bytes(address: IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: u32 = 251;

    fn path(n: u8) -> Option<L2Path> {
        Some(L2Path {
            ifindex: 7,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 1, n],
        })
    }

    fn service(name: &str, backends: &[(u8, u32)]) -> DesiredService {
        DesiredService {
            name: name.into(),
            vip: "198.18.0.100:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            backends: backends
                .iter()
                .map(|(n, w)| DesiredBackend {
                    address: IpAddr::from([198, 18, 1, *n]),
                    weight: *w,
                    path: path(*n),
                    down: false,
                })
                .collect(),
        }
    }

    fn ring_of(r: &Reconciler, name: &str) -> Vec<u32> {
        r.services[name].ring.clone()
    }

    #[test]
    fn new_service_writes_backends_then_ring_then_vip() {
        let mut r = Reconciler::new(RING, 4);
        let (writes, errors) = r.plan(&[service("web", &[(11, 1), (12, 1)])]);
        assert!(errors.is_empty());
        let kinds: Vec<&str> = writes
            .iter()
            .map(|w| match w {
                MapWrite::AddEgressDevice { .. } => "egress",
                MapWrite::SetBackend { .. } => "backend",
                MapWrite::SetRingSlots { .. } => "ring",
                MapWrite::SetVip { .. } => "vip",
                MapWrite::AddVipAddress { .. } => "vip-address",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["egress", "backend", "backend", "ring", "vip", "vip-address"]
        );
        let MapWrite::SetRingSlots { slots, .. } = &writes[3] else {
            unreachable!()
        };
        assert_eq!(
            slots.len(),
            RING as usize,
            "every slot of a fresh ring is written"
        );
        let MapWrite::SetVip { key, info } = &writes[4] else {
            unreachable!()
        };
        assert_eq!(key.port, 80u16.to_be());
        assert_eq!(key.addr[0], u32::from_ne_bytes([198, 18, 0, 100]));
        assert_eq!(info.id, 0);
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let mut r = Reconciler::new(RING, 4);
        let desired = [service("web", &[(11, 1), (12, 1)])];
        r.plan(&desired);
        let (writes, errors) = r.plan(&desired);
        assert!(writes.is_empty(), "{writes:?}");
        assert!(errors.is_empty());
    }

    #[test]
    fn weight_change_rewrites_only_changed_slots() {
        let mut r = Reconciler::new(RING, 4);
        r.plan(&[service("web", &[(11, 1), (12, 1), (13, 1)])]);
        let before = ring_of(&r, "web");
        let (writes, _) = r.plan(&[service("web", &[(11, 1), (12, 1), (13, 3)])]);
        assert_eq!(writes.len(), 1, "{writes:?}");
        let MapWrite::SetRingSlots { slots, .. } = &writes[0] else {
            panic!("{writes:?}")
        };
        let after = ring_of(&r, "web");
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(slots.len(), changed);
        assert!(changed > 0 && changed < RING as usize);
    }

    #[test]
    fn removed_backend_is_retired_until_unreferenced() {
        let mut r = Reconciler::new(RING, 4);
        r.plan(&[service("web", &[(11, 1), (12, 1)])]);
        let id12 = r.backend_id("web", IpAddr::from([198, 18, 1, 12])).unwrap();
        let (writes, _) = r.plan(&[service("web", &[(11, 1)])]);
        assert!(
            !writes
                .iter()
                .any(|w| matches!(w, MapWrite::ClearBackend { .. })),
            "slot stays for pinned flows"
        );
        assert!(!ring_of(&r, "web").contains(&id12));
        assert!(r.retired().contains(&id12));

        // Still referenced by a flow: kept.
        assert!(r.collect_retired(&HashSet::from([id12])).is_empty());
        // A new backend must not reuse the retired id.
        r.plan(&[service("web", &[(11, 1), (14, 1)])]);
        assert_ne!(
            r.backend_id("web", IpAddr::from([198, 18, 1, 14])),
            Some(id12)
        );
        // Unreferenced: cleared and freed.
        assert_eq!(
            r.collect_retired(&HashSet::new()),
            vec![MapWrite::ClearBackend { id: id12 }]
        );
        assert!(r.retired().is_empty());
    }

    #[test]
    fn a_down_backend_is_flagged_in_its_slot_and_cleared_when_up() {
        let mut r = Reconciler::new(RING, 4);
        let mut desired = service("web", &[(11, 1), (12, 1)]);
        r.plan(&[desired.clone()]);
        desired.backends[0].down = true;
        desired.backends[0].weight = 0;
        let (writes, _) = r.plan(&[desired.clone()]);
        let id = r.backend_id("web", IpAddr::from([198, 18, 1, 11])).unwrap();
        assert!(
            matches!(&writes[0], MapWrite::SetBackend { id: i, backend } if *i == id && backend.flags == BACKEND_F_IN_USE | BACKEND_F_DOWN),
            "{writes:?}"
        );
        assert!(matches!(&writes[1], MapWrite::SetRingSlots { .. }));
        assert!(!ring_of(&r, "web").contains(&id));
        desired.backends[0].down = false;
        desired.backends[0].weight = 1;
        let (writes, _) = r.plan(&[desired]);
        assert!(
            matches!(&writes[0], MapWrite::SetBackend { backend, .. } if backend.flags == BACKEND_F_IN_USE)
        );
        assert!(ring_of(&r, "web").contains(&id));
    }

    #[test]
    fn unresolved_backend_gets_no_slot_until_resolved() {
        let mut r = Reconciler::new(RING, 4);
        let mut desired = service("web", &[(11, 1), (12, 1)]);
        desired.backends[1].path = None;
        r.plan(&[desired.clone()]);
        assert_eq!(r.backend_id("web", IpAddr::from([198, 18, 1, 12])), None);
        desired.backends[1].path = path(12);
        r.plan(&[desired]);
        let id = r.backend_id("web", IpAddr::from([198, 18, 1, 12])).unwrap();
        assert!(ring_of(&r, "web").contains(&id));
    }

    #[test]
    fn removed_service_clears_vip_ring_and_retires_backends() {
        let mut r = Reconciler::new(RING, 4);
        r.plan(&[
            service("web", &[(11, 1)]),
            service_on("dns", 53, &[(21, 1)]),
        ]);
        let (writes, _) = r.plan(&[service_on("dns", 53, &[(21, 1)])]);
        assert!(
            matches!(writes[0], MapWrite::RemoveVip { .. }),
            "{writes:?}"
        );
        // Another service still lives on 198.18.0.100: the address stays.
        assert!(
            !writes
                .iter()
                .any(|w| matches!(w, MapWrite::RemoveVipAddress { .. }))
        );
        assert!(writes.iter().any(|w| matches!(w, MapWrite::SetRingSlots { slots, .. } if slots.iter().all(|(_, id)| *id == 0))));
        assert_eq!(r.retired().len(), 1);
        let (writes, _) = r.plan(&[]);
        assert!(
            writes
                .iter()
                .any(|w| matches!(w, MapWrite::RemoveVipAddress { .. }))
        );
        // The freed VIP id is reused.
        r.plan(&[service("web", &[(11, 1)])]);
        assert!(r.vip_id("web").unwrap() <= 1);
    }

    #[test]
    fn running_out_of_vip_ids_is_reported() {
        let mut r = Reconciler::new(RING, 1);
        let (_, errors) = r.plan(&[
            service("web", &[(11, 1)]),
            service_on("dns", 53, &[(21, 1)]),
        ]);
        assert_eq!(errors, vec![ReconcileError::OutOfVipIds("dns".into())]);
        assert!(r.vip_id("web").is_some());
    }

    /// What a previous agent's maps look like after `plan(desired)`.
    fn maps_after(desired: &[DesiredService]) -> (Reconciler, MapsState) {
        let mut r = Reconciler::new(RING, 4);
        let (writes, _) = r.plan(desired);
        let mut maps = MapsState::default();
        for w in writes {
            match w {
                MapWrite::SetVip { key, info } => maps.vips.push((key, info)),
                MapWrite::SetBackend { id, backend } => maps.backends.push((id, backend)),
                MapWrite::AddEgressDevice { ifindex } => maps.egress_devices.push(ifindex),
                MapWrite::SetRingSlots { vip_id, slots } => {
                    let ring = maps
                        .rings
                        .entry(vip_id)
                        .or_insert_with(|| vec![0; RING as usize]);
                    for (i, id) in slots {
                        ring[i as usize] = id;
                    }
                }
                _ => {}
            }
        }
        (r, maps)
    }

    fn names_and_keys(desired: &[DesiredService]) -> Vec<(String, VipKey)> {
        desired
            .iter()
            .map(|s| (s.name.clone(), vip_key(s)))
            .collect()
    }

    #[test]
    fn adopting_the_same_state_keeps_every_id_and_writes_nothing() {
        let desired = [
            service("web", &[(11, 1), (12, 2)]),
            service_on("dns", 53, &[(21, 1)]),
        ];
        let (before, maps) = maps_after(&desired);
        let mut adopted = Reconciler::adopt(RING, 4, &maps, &names_and_keys(&desired));
        for (name, n) in [("web", 11), ("web", 12), ("dns", 21)] {
            let a = IpAddr::from([198, 18, 1, n]);
            assert_eq!(adopted.backend_id(name, a), before.backend_id(name, a));
        }
        assert_eq!(adopted.vip_id("dns"), before.vip_id("dns"));
        let (writes, errors) = adopted.plan(&desired);
        assert!(writes.is_empty() && errors.is_empty(), "{writes:?}");
    }

    #[test]
    fn adopting_then_changing_reconciles_to_the_new_config() {
        let old = [
            service("web", &[(11, 1), (12, 1)]),
            service_on("dns", 53, &[(21, 1)]),
        ];
        let (before, maps) = maps_after(&old);
        // The new config dropped dns and backend 12, and added 13.
        let new = [service("web", &[(11, 1), (13, 1)])];
        let mut r = Reconciler::adopt(RING, 4, &maps, &names_and_keys(&old[..1]));
        let (writes, _) = r.plan(&new);
        assert!(
            writes
                .iter()
                .any(|w| matches!(w, MapWrite::RemoveVip { key } if key.port == 53u16.to_be())),
            "{writes:?}"
        );
        let id12 = before
            .backend_id("web", IpAddr::from([198, 18, 1, 12]))
            .unwrap();
        let id21 = before
            .backend_id("dns", IpAddr::from([198, 18, 1, 21]))
            .unwrap();
        assert!(r.retired().contains(&id12) && r.retired().contains(&id21));
        let id13 = r.backend_id("web", IpAddr::from([198, 18, 1, 13])).unwrap();
        assert!(
            ![id12, id21].contains(&id13),
            "a slot that flows may use was reused"
        );
        assert_eq!(
            r.backend_id("web", IpAddr::from([198, 18, 1, 11])),
            before.backend_id("web", IpAddr::from([198, 18, 1, 11]))
        );
    }

    fn service_on(name: &str, port: u16, backends: &[(u8, u32)]) -> DesiredService {
        let mut s = service(name, backends);
        s.vip.set_port(port);
        s
    }
}
