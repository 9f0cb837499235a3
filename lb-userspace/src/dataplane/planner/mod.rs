//! The one step that turns the agent's desired state into map writes.
//!
//! `Reconciler` keeps a record of what the maps hold (ids, rings, backends,
//! VIP entries) and computes the writes that take the maps from there to a
//! new desired state. It performs no I/O; the writer (`dataplane::writer`)
//! executes the writes in order. `plan` records its writes as done; every
//! write the kernel refuses is handed back to `forget`, which undoes its
//! record, so the next `plan` writes it again: the record never claims what
//! the kernel did not accept.
//!
//! Order of writes keeps the data plane consistent at every step: egress
//! devices and backend slots before the ring slots that point at them, rings
//! before the VIP entry that makes them reachable; on removal the reverse.
//! A backend that leaves a service is *retired*: its slot stays valid so
//! pinned flows keep flowing, and its id is freed only once no
//! connection-table entry refers to it (`collect_retired`).

pub mod follow;
pub mod nat;
mod services;
mod upkeep;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    BACKEND_F_DOWN, BACKEND_F_ELIGIBLE, BACKEND_F_IN_USE, Backend, FAMILY_IPV4, FAMILY_IPV6, LeastConnCandidates,
    MAX_BACKENDS, NAT_F_PRESERVE_CLIENT, NatPool, VipAddressKey, VipInfo, VipKey, forwarding::NAT,
};

use crate::{
    config::{BackendAddress, Scheduler},
    netlink::L2Path,
    scheduling::{
        self,
        maglev::{self, MaglevBackend},
    },
    state::{DesiredBackend, DesiredService},
};

/// A ring slot whose content is unknown (a write to it failed): it differs
/// from every backend id, so the next plan writes it.
const UNKNOWN_SLOT: u32 = u32::MAX;

/// The maps' contents as a restarted agent finds them.
#[derive(Debug, Default)]
pub struct MapsState {
    pub vips: Vec<(VipKey, VipInfo)>,
    pub backends: Vec<(u32, Backend)>,
    pub rings: std::collections::HashMap<u32, Vec<u32>>,
    pub egress_devices: Vec<u32>,
    pub nat_pools: std::collections::HashMap<u32, NatPool>,
    /// What `NAT_SERVICES` holds.
    pub nat_services: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapWrite {
    AddEgressDevice {
        ifindex: u32,
    },
    SetBackend {
        id: u32,
        backend: Backend,
    },
    ClearBackend {
        id: u32,
    },
    SetRingSlots {
        vip_id: u32,
        slots: Vec<(u32, u32)>,
    },
    SetVip {
        key: VipKey,
        info: VipInfo,
    },
    RemoveVip {
        key: VipKey,
    },
    AddVipAddress {
        key: VipAddressKey,
    },
    RemoveVipAddress {
        key: VipAddressKey,
    },
    /// least_conn: what the connection-table scan counts minus what the data
    /// plane counted, added to the data plane's count.
    SetActiveCorrection {
        id: u32,
        correction: i64,
    },
    /// How many wildcard (port 0) VIPs exist.
    SetWildcardVips {
        count: u32,
    },
    /// A NAT service's translation settings (`NAT_POOLS`), written before
    /// its VIP entry.
    SetNatPool {
        vip_id: u32,
        pool: NatPool,
    },
    /// A least_conn service's candidates and weights
    /// (`LEAST_CONN_CANDIDATES`), written with its ring.
    SetLeastConnCandidates {
        vip_id: u32,
        candidates: LeastConnCandidates,
    },
    /// How many NAT services exist (`NAT_SERVICES`).
    SetNatServices {
        count: u32,
    },
    /// An ended NAT flow's translation (`NAT_FLOWS`), removed first.
    RemoveNatFlow {
        key: lb_common::FlowKey,
    },
    /// Its reply entry (`NAT_REPLIES`): the source port is free again.
    RemoveNatReply {
        key: lb_common::FlowKey,
    },
    /// A flow a peer pinned (connection-table sync), unless this node has
    /// an entry for it already: its own view wins.
    AdoptFlow {
        key: lb_common::FlowKey,
        state: lb_common::FlowState,
    },
}

#[derive(Debug)]
struct AppliedService {
    vip_id: u32,
    key: VipKey,
    /// As written to `VIPS`; `None` until written (or after a failed write).
    info: Option<VipInfo>,
    /// Backend address → slot id, for the backends currently in the service.
    backends: BTreeMap<BackendAddress, u32>,
    /// As written to `NAT_POOLS` (NAT services); `None` until written.
    nat: Option<NatPool>,
    /// As written to `LEAST_CONN_CANDIDATES` (least_conn services); `None`
    /// until written (a map each program has its own of: never adopted).
    candidates: Option<LeastConnCandidates>,
}

#[derive(Debug)]
pub struct Reconciler {
    ring_size: u32,
    services: BTreeMap<String, AppliedService>,
    /// What `RING_SLOTS` holds per VIP id, for ids in use or whose clearing
    /// failed; an id without a record holds only `NO_BACKEND`. Shared
    /// with the table scan's checks, which must not copy every ring.
    rings: BTreeMap<u32, Arc<Vec<u32>>>,
    /// What `BACKENDS` holds; a slot without a record is rewritten.
    backends: BTreeMap<u32, Backend>,
    retired: BTreeSet<u32>,
    free_vip_ids: Vec<u32>,
    free_backend_ids: Vec<u32>,
    egress_devices: BTreeSet<u32>,
    /// What `VIP_ADDRESSES` holds.
    vip_addresses: BTreeSet<VipAddressKey>,
    /// VIP entries that must go but whose removal failed.
    stale_vips: BTreeSet<VipKey>,
    /// As written to `WILDCARD_VIPS`; `None` when unknown.
    wildcard_vips: Option<u32>,
    /// As written to `NAT_SERVICES`; `None` when unknown.
    nat_services: Option<u32>,
    /// Per VIP id in use, the generation of its ring (`follow`): the last
    /// value of `ring_generation` when the ring was written.
    ring_generations: BTreeMap<u32, u64>,
    ring_generation: u64,
    /// Per VIP id, the ring generation a table scan found all its TCP pins
    /// following (`VIP_F_PINS_FOLLOW_RING` while still current).
    pins_follow: BTreeMap<u32, u64>,
    /// VIP ids whose entry may carry `VIP_F_PINS_FOLLOW_RING` in the map:
    /// written with it, and not since (surely) without it.
    maybe_flagged: BTreeSet<u32>,
    /// VIP ids the last plan wrote without the flag while it may have been
    /// there: unless the write is forgotten (refused) before the next plan,
    /// it was applied.
    unflag_planned: BTreeSet<u32>,
}

/// Why a desired state could not be applied in full.
#[derive(Debug, PartialEq, Eq)]
pub enum ReconcileError {
    OutOfVipIds(String),
    OutOfBackendIds(String, BackendAddress),
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
            rings: BTreeMap::new(),
            backends: BTreeMap::new(),
            retired: BTreeSet::new(),
            // Popped from the end: lowest ids first.
            free_vip_ids: (0..max_services).rev().collect(),
            free_backend_ids: (1..MAX_BACKENDS).rev().collect(),
            egress_devices: BTreeSet::new(),
            vip_addresses: BTreeSet::new(),
            stale_vips: BTreeSet::new(),
            wildcard_vips: Some(0),
            nat_services: Some(0),
            ring_generations: BTreeMap::new(),
            ring_generation: 0,
            pins_follow: BTreeMap::new(),
            maybe_flagged: BTreeSet::new(),
            unflag_planned: BTreeSet::new(),
        }
    }

    /// Takes over the state a previous agent left in pinned maps: VIP ids,
    /// backend slots (which flows in the connection table point at) and ring
    /// contents. VIPs are matched to `services` by (address, port,
    /// protocol); a VIP no service claims is removed by the next `plan`, and
    /// a slot no service claims is retired.
    pub fn adopt(ring_size: u32, max_services: u32, maps: &MapsState, services: &[(String, VipKey)]) -> Self {
        let mut r = Self::new(ring_size, max_services);
        for (key, info) in &maps.vips {
            let name = services
                .iter()
                .find(|(_, k)| k == key)
                .map(|(name, _)| name.clone())
                .unwrap_or_else(|| format!("<unconfigured VIP {}>", info.id));
            let ring =
                maps.rings.get(&info.id).cloned().unwrap_or_else(|| vec![lb_common::NO_BACKEND; ring_size as usize]);
            r.free_vip_ids.retain(|id| *id != info.id);
            if info.flags & lb_common::VIP_F_PINS_FOLLOW_RING != 0 {
                r.maybe_flagged.insert(info.id);
            }
            r.vip_addresses.insert(vip_address_key(key));
            r.rings.insert(info.id, Arc::new(ring));
            r.services.insert(
                name,
                AppliedService {
                    vip_id: info.id,
                    key: *key,
                    info: Some(*info),
                    backends: BTreeMap::new(),
                    nat: maps.nat_pools.get(&info.id).copied(),
                    candidates: None,
                },
            );
        }
        for (id, backend) in &maps.backends {
            r.free_backend_ids.retain(|free| free != id);
            r.backends.insert(*id, *backend);
            let address = BackendAddress {
                ip: words_address(backend.addr, backend.family),
                port: (backend.port != 0).then(|| u16::from_be(backend.port)),
            };
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
        r.wildcard_vips = Some(r.services.values().filter(|s| s.key.port == 0).count() as u32);
        r.nat_services = Some(maps.nat_services);
        r
    }

    /// Ids of backends that left their service but may still have flows.
    pub fn retired(&self) -> &BTreeSet<u32> {
        &self.retired
    }

    /// The slot id of a backend of a service, if it has one.
    pub fn backend_id(&self, service: &str, address: BackendAddress) -> Option<u32> {
        self.services.get(service)?.backends.get(&address).copied()
    }

    /// Backend slot id → (service, address), for every backend in a service.
    pub fn backends_by_id(&self) -> std::collections::HashMap<u32, (&str, BackendAddress)> {
        self.services
            .iter()
            .flat_map(|(name, s)| s.backends.iter().map(move |(address, id)| (*id, (name.as_str(), *address))))
            .collect()
    }

    pub fn vip_id(&self, service: &str) -> Option<u32> {
        self.services.get(service).map(|s| s.vip_id)
    }

    /// Writes that take the maps to `desired`. Services or backends that do
    /// not fit are reported and left out; everything else is applied.
    pub fn plan(&mut self, desired: &[DesiredService]) -> (Vec<MapWrite>, Vec<ReconcileError>) {
        for vip_id in std::mem::take(&mut self.unflag_planned) {
            self.maybe_flagged.remove(&vip_id);
        }
        let mut writes = Vec::new();
        let mut errors = Vec::new();
        let wanted: HashSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
        // More wildcard VIPs: announce them before they exist.
        let wildcards = desired.iter().filter(|s| s.vip.port() == 0).count() as u32;
        if self.wildcard_vips.is_none_or(|count| wildcards > count) {
            let applied = self.services.values().filter(|s| s.key.port == 0).count() as u32;
            let count = wildcards.max(applied);
            writes.push(MapWrite::SetWildcardVips { count });
            self.wildcard_vips = Some(count);
        }
        // More NAT services: replies are looked for before the first VIP exists.
        let nat_services = desired.iter().filter(|s| s.nat.is_some()).count() as u32;
        if self.nat_services.is_none_or(|count| nat_services > count) {
            let count = nat_services.max(self.nat_in_use());
            writes.push(MapWrite::SetNatServices { count });
            self.nat_services = Some(count);
        }

        let gone: Vec<String> = self.services.keys().filter(|name| !wanted.contains(name.as_str())).cloned().collect();
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
        // VIP entries whose removal failed before, unless a service owns the key again.
        let owned: BTreeSet<VipKey> = self.services.values().map(|s| s.key).collect();
        for key in std::mem::take(&mut self.stale_vips) {
            if !owned.contains(&key) {
                writes.push(MapWrite::RemoveVip { key });
            }
        }
        // Rings whose clearing failed before, unless a service took their id again.
        let in_use: BTreeSet<u32> = self.services.values().map(|s| s.vip_id).collect();
        let orphans: Vec<u32> = self.rings.keys().filter(|id| !in_use.contains(id)).copied().collect();
        for vip_id in orphans {
            self.clear_ring(vip_id, &mut writes);
        }
        self.plan_vip_addresses(&mut writes);
        // Fewer: after they are gone.
        let applied = self.services.values().filter(|s| s.key.port == 0).count() as u32;
        if self.wildcard_vips.is_none_or(|count| applied < count) {
            writes.push(MapWrite::SetWildcardVips { count: applied });
            self.wildcard_vips = Some(applied);
        }
        self.lower_nat_services(&mut writes);
        (writes, errors)
    }

    /// What `NAT_SERVICES` must say: the NAT services, plus one while a
    /// retired NAT slot may still carry flows (a service removed or switched
    /// away from NAT): their replies are translated until they end.
    fn nat_in_use(&self) -> u32 {
        let services = self.services.values().filter(|s| s.nat.is_some()).count() as u32;
        services + u32::from(self.retired_nat_slots().next().is_some())
    }

    /// Retired NAT slots: their flows may still run, pinned by their
    /// translations, until the table scan frees them.
    fn retired_nat_slots(&self) -> impl Iterator<Item = &Backend> {
        self.retired.iter().filter_map(|id| self.backends.get(id)).filter(|b| b.forwarding == NAT)
    }

    /// Interfaces that NAT slots, serving or retired with their flows, reach
    /// their backends by: the backends' replies arrive there.
    pub fn nat_interfaces(&self) -> BTreeSet<u32> {
        self.backends.values().filter(|b| b.forwarding == NAT).map(|b| b.ifindex).collect()
    }

    /// Lowers the NAT count to what is in use, after the writes that made it so.
    fn lower_nat_services(&mut self, writes: &mut Vec<MapWrite>) {
        let in_use = self.nat_in_use();
        if self.nat_services.is_none_or(|count| in_use < count) {
            writes.push(MapWrite::SetNatServices { count: in_use });
            self.nat_services = Some(in_use);
        }
    }

    /// `VIP_ADDRESSES` holds the address of every VIP, and nothing else.
    fn plan_vip_addresses(&mut self, writes: &mut Vec<MapWrite>) {
        let wanted: BTreeSet<VipAddressKey> = self.services.values().map(|s| vip_address_key(&s.key)).collect();
        for key in wanted.difference(&self.vip_addresses) {
            writes.push(MapWrite::AddVipAddress { key: *key });
        }
        for key in self.vip_addresses.difference(&wanted) {
            writes.push(MapWrite::RemoveVipAddress { key: *key });
        }
        self.vip_addresses = wanted;
    }

    /// Undoes the record of a write the kernel refused (for ring slots: the
    /// slots that were not written), so that the next `plan` (or
    /// `collect_retired`) writes it again.
    pub fn forget(&mut self, write: &MapWrite) {
        match write {
            MapWrite::AddEgressDevice { ifindex } => {
                self.egress_devices.remove(ifindex);
            }
            MapWrite::SetBackend { id, .. } => {
                self.backends.remove(id);
            }
            MapWrite::ClearBackend { id } => {
                self.free_backend_ids.retain(|free| free != id);
                self.backends.remove(id);
                self.retired.insert(*id);
            }
            MapWrite::SetRingSlots { vip_id, slots } => {
                self.ring_rewritten(*vip_id);
                let size = self.ring_size as usize;
                let ring = self.rings.entry(*vip_id).or_insert_with(|| Arc::new(vec![lb_common::NO_BACKEND; size]));
                let ring = Arc::make_mut(ring);
                for (slot, _) in slots {
                    if let Some(recorded) = ring.get_mut(*slot as usize) {
                        *recorded = UNKNOWN_SLOT;
                    }
                }
            }
            MapWrite::SetVip { key, info } => {
                if let Some(service) = self.services.values_mut().find(|s| s.key == *key) {
                    service.info = None;
                }
                // A refused write that would have cleared the flag left it.
                self.unflag_planned.remove(&info.id);
            }
            MapWrite::RemoveVip { key } => {
                self.stale_vips.insert(*key);
            }
            MapWrite::AddVipAddress { key } => {
                self.vip_addresses.remove(key);
            }
            MapWrite::RemoveVipAddress { key } => {
                self.vip_addresses.insert(*key);
            }
            // Recomputed from every connection-table scan.
            MapWrite::SetActiveCorrection { .. } => {}
            MapWrite::SetWildcardVips { .. } => self.wildcard_vips = None,
            MapWrite::SetNatPool { vip_id, .. } => {
                if let Some(service) = self.services.values_mut().find(|s| s.vip_id == *vip_id) {
                    service.nat = None;
                }
            }
            MapWrite::SetLeastConnCandidates { vip_id, .. } => {
                if let Some(service) = self.services.values_mut().find(|s| s.vip_id == *vip_id) {
                    service.candidates = None;
                }
            }
            MapWrite::SetNatServices { .. } => self.nat_services = None,
            // Recomputed from every NAT scan.
            MapWrite::RemoveNatFlow { .. } | MapWrite::RemoveNatReply { .. } => {}
            // A peer's flow is not retried: it comes again if the peer re-sends.
            MapWrite::AdoptFlow { .. } => {}
        }
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
    VipAddressKey { addr: key.addr, family: key.family, _pad: [0; 3] }
}

fn backend_slot(
    address: BackendAddress,
    path: L2Path,
    desired: &DesiredBackend,
    service: &DesiredService,
    vip_id: u32,
) -> Backend {
    let mut flags = BACKEND_F_IN_USE;
    if desired.down {
        flags |= BACKEND_F_DOWN;
    }
    if desired.weight > 0 {
        flags |= BACKEND_F_ELIGIBLE;
    }
    Backend {
        addr: address_words(address.ip),
        family: family(address.ip),
        flags,
        weight: desired.weight.min(u16::MAX as u32) as u16,
        ifindex: path.ifindex,
        dst_mac: path.dst_mac,
        src_mac: path.src_mac,
        vip_id,
        tunnel_src: path.source.map(address_words).unwrap_or_default(),
        forwarding: service.forwarding.mode(),
        _pad: 0,
        gue_port: service.gue_port.to_be(),
        mtu: path.mtu,
        port: address.port.unwrap_or(0).to_be(),
    }
}

/// A NAT service's `NAT_POOLS` entry.
pub fn nat_pool(nat: &crate::state::DesiredNat) -> NatPool {
    let (port_count, skip_from, skip_len) = nat.pool();
    let mut pool = NatPool {
        source_count: nat.sources.len().min(lb_common::MAX_NAT_SOURCES) as u32,
        flags: if nat.preserve_client { NAT_F_PRESERVE_CLIENT } else { 0 },
        port_low: nat.ports.low,
        port_count,
        skip_from,
        skip_len,
        ..NatPool::default()
    };
    for (slot, source) in pool.sources.iter_mut().zip(&nat.sources) {
        *slot = address_words(*source);
    }
    pool
}

/// What Maglev hashes to place a backend: its address, and its port when it
/// has one (two ports of one host are two backends).
fn backend_identity(address: BackendAddress) -> Vec<u8> {
    let mut bytes = address_bytes(address.ip);
    if let Some(port) = address.port {
        bytes.extend_from_slice(&port.to_be_bytes());
    }
    bytes
}

pub fn words_address(words: [u32; 4], family: u8) -> IpAddr {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if family == FAMILY_IPV4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes"))
    }
}

pub fn family(address: IpAddr) -> u8 {
    if address.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 }
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
    use lb_common::scheduler;

    use super::*;
    use crate::config::Protocol;

    const RING: u32 = 251;

    fn backend_address(octets: [u8; 4]) -> BackendAddress {
        BackendAddress::new(IpAddr::from(octets))
    }

    fn path(n: u8) -> Option<L2Path> {
        Some(L2Path { ifindex: 7, src_mac: [2, 0, 0, 0, 0, 1], dst_mac: [2, 0, 0, 0, 1, n], mtu: 1500, source: None })
    }

    fn service(name: &str, backends: &[(u8, u32)]) -> DesiredService {
        let backends = backends
            .iter()
            .map(|(n, w)| DesiredBackend {
                address: backend_address([198, 18, 1, *n]),
                weight: *w,
                path: path(*n),
                down: false,
            })
            .collect();
        DesiredService::dsr(name, "198.18.0.100:80".parse().unwrap(), Protocol::Tcp, backends)
    }

    fn ring_of(r: &Reconciler, name: &str) -> Vec<u32> {
        r.rings[&r.services[name].vip_id].to_vec()
    }

    #[test]
    fn tunnel_slots_carry_mode_port_source_and_mtu_and_change_with_them() {
        let mut r = Reconciler::new(RING, 4);
        let mut desired = service("web", &[(11, 1)]);
        desired.forwarding = crate::config::Forwarding::Gue;
        desired.gue_port = 7000;
        desired.backends[0].path =
            desired.backends[0].path.map(|p| L2Path { mtu: 9000, source: Some("198.18.2.3".parse().unwrap()), ..p });
        let (writes, _) = r.plan(std::slice::from_ref(&desired));
        let slot = writes
            .iter()
            .find_map(|w| match w {
                MapWrite::SetBackend { backend, .. } => Some(*backend),
                _ => None,
            })
            .expect("a backend slot");
        assert_eq!(slot.forwarding, lb_common::forwarding::GUE);
        assert_eq!(slot.gue_port, 7000u16.to_be());
        assert_eq!(slot.mtu, 9000);
        assert_eq!(slot.tunnel_src, address_words("198.18.2.3".parse().unwrap()));
        // The service switches to IPIP: the slot is rewritten in place.
        desired.forwarding = crate::config::Forwarding::Ipip;
        let (writes, _) = r.plan(std::slice::from_ref(&desired));
        assert!(
            matches!(&writes[..], [MapWrite::SetBackend { backend, .. }] if backend.forwarding == lb_common::forwarding::IPIP),
            "{writes:?}"
        );
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
        assert_eq!(kinds, ["egress", "backend", "backend", "ring", "vip", "vip-address"]);
        let MapWrite::SetRingSlots { slots, .. } = &writes[3] else { unreachable!() };
        assert_eq!(slots.len(), RING as usize, "every slot of a fresh ring is written");
        let MapWrite::SetVip { key, info } = &writes[4] else { unreachable!() };
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
        // The reweighted backend's slot (it carries the weight), then only the
        // ring slots that changed.
        assert_eq!(writes.len(), 2, "{writes:?}");
        let id13 = r.backend_id("web", backend_address([198, 18, 1, 13])).unwrap();
        assert!(
            matches!(&writes[0], MapWrite::SetBackend { id, backend } if *id == id13 && backend.weight == 3),
            "{writes:?}"
        );
        let MapWrite::SetRingSlots { slots, .. } = &writes[1] else { panic!("{writes:?}") };
        let after = ring_of(&r, "web");
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(slots.len(), changed);
        assert!(changed > 0 && changed < RING as usize);
    }

    #[test]
    fn turning_nat_on_gives_backends_new_slots_and_retires_the_old_ones_with_their_flows() {
        let mut r = Reconciler::new(RING, 4);
        let dsr = service("web", &[(11, 1), (12, 1)]);
        r.plan(std::slice::from_ref(&dsr));
        let address = backend_address([198, 18, 1, 11]);
        let dsr_id = r.backend_id("web", address).unwrap();
        let mut translated = nat("web", &[]);
        translated.backends = dsr.backends.clone();
        let (writes, errors) = r.plan(std::slice::from_ref(&translated));
        assert!(errors.is_empty(), "{errors:?}");
        let nat_id = r.backend_id("web", address).unwrap();
        assert_ne!(nat_id, dsr_id, "a DSR slot was switched to NAT under its flows");
        assert!(r.retired().contains(&dsr_id));
        assert!(!writes.iter().any(|w| matches!(w, MapWrite::SetBackend { id, .. } if *id == dsr_id)));
        assert!(writes.iter().any(|w| matches!(w, MapWrite::SetBackend { id, backend }
            if *id == nat_id && backend.forwarding == lb_common::forwarding::NAT)));
        assert!(!ring_of(&r, "web").contains(&dsr_id));
        // Its VIP says NAT: established packets look for their translation first.
        assert!(
            writes.iter().any(|w| matches!(w, MapWrite::SetVip { info, .. } if info.flags == lb_common::VIP_F_NAT))
        );
        // The same again: the slots stay.
        let (writes, _) = r.plan(std::slice::from_ref(&translated));
        assert!(writes.is_empty(), "{writes:?}");
        // And back: new slots again, the NAT ones retired with their flows.
        // Its VIP says its NAT flows linger: a packet its connection table
        // does not pin looks for their translations.
        let (writes, _) = r.plan(std::slice::from_ref(&dsr));
        let lingering = lb_common::VIP_F_NAT_FLOWS_LINGER;
        assert!(writes.iter().any(|w| matches!(w, MapWrite::SetVip { info, .. } if info.flags == lingering)));
        let back_id = r.backend_id("web", address).unwrap();
        assert!(![dsr_id, nat_id].contains(&back_id));
        assert!(r.retired().contains(&nat_id));
        // Planned again, it says so still.
        assert!(r.plan(std::slice::from_ref(&dsr)).0.is_empty());
        // Its replies still arrive behind the NAT slots' interface until
        // the scan finds them unreferenced.
        let nat_ifindex = r.backends[&nat_id].ifindex;
        assert_eq!(r.nat_interfaces(), BTreeSet::from([nat_ifindex]));
        let writes = r.collect_retired(&HashSet::from([nat_id]));
        assert!(!writes.iter().any(|w| matches!(w, MapWrite::SetVip { .. })), "{writes:?}");
        assert_eq!(r.nat_interfaces(), BTreeSet::from([nat_ifindex]));
        // The last NAT flow ended: the VIP stops looking, once.
        let writes = r.collect_retired(&HashSet::new());
        assert!(r.nat_interfaces().is_empty());
        assert!(writes.iter().any(|w| matches!(w, MapWrite::SetVip { info, .. } if info.flags == 0)), "{writes:?}");
        assert!(r.collect_retired(&HashSet::new()).is_empty());
        assert!(r.plan(std::slice::from_ref(&dsr)).0.is_empty());
    }

    #[test]
    fn a_service_that_never_was_nat_does_not_look_for_translations() {
        let mut r = Reconciler::new(RING, 4);
        let mut gateway = nat("gw", &[(21, 8080)]);
        gateway.vip = "198.18.0.101:80".parse().unwrap();
        let (writes, _) = r.plan(&[service("web", &[(11, 1)]), gateway]);
        let flags: Vec<u32> = writes
            .iter()
            .filter_map(|w| if let MapWrite::SetVip { info, .. } = w { Some(info.flags) } else { None })
            .collect();
        assert_eq!(flags.len(), 2);
        assert!(flags.iter().all(|f| f & lb_common::VIP_F_NAT_FLOWS_LINGER == 0), "{flags:?}");
        // Nor after the NAT service is removed, its slots retired with their
        // flows: those are another VIP's.
        let (writes, _) = r.plan(&[service("web", &[(11, 1)])]);
        assert!(!writes.iter().any(|w| matches!(w, MapWrite::SetVip { .. })), "{writes:?}");
        assert!(!r.retired().is_empty());
    }

    #[test]
    fn removed_backend_is_retired_until_unreferenced() {
        let mut r = Reconciler::new(RING, 4);
        r.plan(&[service("web", &[(11, 1), (12, 1)])]);
        let id12 = r.backend_id("web", backend_address([198, 18, 1, 12])).unwrap();
        let (writes, _) = r.plan(&[service("web", &[(11, 1)])]);
        assert!(!writes.iter().any(|w| matches!(w, MapWrite::ClearBackend { .. })), "slot stays for pinned flows");
        assert!(!ring_of(&r, "web").contains(&id12));
        assert!(r.retired().contains(&id12));

        // Still referenced by a flow: kept.
        assert!(r.collect_retired(&HashSet::from([id12])).is_empty());
        // A new backend must not reuse the retired id.
        r.plan(&[service("web", &[(11, 1), (14, 1)])]);
        assert_ne!(r.backend_id("web", backend_address([198, 18, 1, 14])), Some(id12));
        // Unreferenced: cleared and freed.
        assert_eq!(r.collect_retired(&HashSet::new()), vec![MapWrite::ClearBackend { id: id12 }]);
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
        let id = r.backend_id("web", backend_address([198, 18, 1, 11])).unwrap();
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
            matches!(&writes[0], MapWrite::SetBackend { backend, .. } if backend.flags == BACKEND_F_IN_USE | BACKEND_F_ELIGIBLE),
            "{writes:?}"
        );
        assert!(ring_of(&r, "web").contains(&id));
    }

    #[test]
    fn unresolved_backend_gets_no_slot_until_resolved() {
        let mut r = Reconciler::new(RING, 4);
        let mut desired = service("web", &[(11, 1), (12, 1)]);
        desired.backends[1].path = None;
        r.plan(&[desired.clone()]);
        assert_eq!(r.backend_id("web", backend_address([198, 18, 1, 12])), None);
        desired.backends[1].path = path(12);
        r.plan(&[desired]);
        let id = r.backend_id("web", backend_address([198, 18, 1, 12])).unwrap();
        assert!(ring_of(&r, "web").contains(&id));
    }

    #[test]
    fn removed_service_clears_vip_ring_and_retires_backends() {
        let mut r = Reconciler::new(RING, 4);
        r.plan(&[service("web", &[(11, 1)]), service_on("dns", 53, &[(21, 1)])]);
        let (writes, _) = r.plan(&[service_on("dns", 53, &[(21, 1)])]);
        assert!(matches!(writes[0], MapWrite::RemoveVip { .. }), "{writes:?}");
        // Another service still lives on 198.18.0.100: the address stays.
        assert!(!writes.iter().any(|w| matches!(w, MapWrite::RemoveVipAddress { .. })));
        assert!(
            writes
                .iter()
                .any(|w| matches!(w, MapWrite::SetRingSlots { slots, .. } if slots.iter().all(|(_, id)| *id == 0)))
        );
        assert_eq!(r.retired().len(), 1);
        let (writes, _) = r.plan(&[]);
        assert!(writes.iter().any(|w| matches!(w, MapWrite::RemoveVipAddress { .. })));
        // The freed VIP id is reused.
        r.plan(&[service("web", &[(11, 1)])]);
        assert!(r.vip_id("web").unwrap() <= 1);
    }

    #[test]
    fn running_out_of_vip_ids_is_reported() {
        let mut r = Reconciler::new(RING, 1);
        let (_, errors) = r.plan(&[service("web", &[(11, 1)]), service_on("dns", 53, &[(21, 1)])]);
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
                MapWrite::SetNatPool { vip_id, pool } => {
                    maps.nat_pools.insert(vip_id, pool);
                }
                MapWrite::SetNatServices { count } => maps.nat_services = count,
                MapWrite::SetRingSlots { vip_id, slots } => {
                    let ring = maps.rings.entry(vip_id).or_insert_with(|| vec![0; RING as usize]);
                    for (i, id) in slots {
                        ring[i as usize] = id;
                    }
                }
                _ => {}
            }
        }
        (r, maps)
    }

    fn nat(name: &str, backends: &[(u8, u16)]) -> DesiredService {
        let mut desired = service(name, &[]);
        desired.forwarding = crate::config::Forwarding::Nat;
        desired.nat = Some(crate::state::DesiredNat {
            sources: vec!["198.18.2.1".parse().unwrap()],
            ports: "40000-40099".parse().unwrap(),
            preserve_client: false,
            exclude: None,
        });
        desired.backends = backends
            .iter()
            .map(|(n, port)| DesiredBackend {
                address: BackendAddress { ip: IpAddr::from([198, 18, 1, *n]), port: Some(*port) },
                weight: 1,
                path: path(*n),
                down: false,
            })
            .collect();
        desired
    }

    #[test]
    fn a_nat_service_has_its_pool_before_its_vip_and_the_count_of_nat_services_follows() {
        let mut r = Reconciler::new(RING, 4);
        // One host, two ports: two backends, two slots, each with its port.
        let (writes, errors) = r.plan(&[nat("web", &[(11, 8080), (11, 8081)])]);
        assert!(errors.is_empty(), "{errors:?}");
        let position = |f: &dyn Fn(&MapWrite) -> bool| writes.iter().position(f).unwrap();
        let count = position(&|w| matches!(w, MapWrite::SetNatServices { count: 1 }));
        let pool = position(
            &|w| matches!(w, MapWrite::SetNatPool { pool, .. } if pool.port_count == 100 && pool.source_count == 1),
        );
        let vip = position(&|w| matches!(w, MapWrite::SetVip { .. }));
        assert!(count < vip && pool < vip, "{writes:?}");
        let ports: BTreeSet<u16> = writes
            .iter()
            .filter_map(|w| match w {
                MapWrite::SetBackend { backend, .. } => Some(u16::from_be(backend.port)),
                _ => None,
            })
            .collect();
        assert_eq!(ports, BTreeSet::from([8080, 8081]));
        // Unchanged: nothing to write.
        assert!(r.plan(&[nat("web", &[(11, 8080), (11, 8081)])]).0.is_empty());
        // Gone: its slots are retired and may still carry flows, whose
        // replies must still be translated: the count stays...
        let (writes, _) = r.plan(&[]);
        assert!(writes.iter().any(|w| matches!(w, MapWrite::RemoveVip { .. })), "{writes:?}");
        assert!(!writes.iter().any(|w| matches!(w, MapWrite::SetNatServices { .. })), "{writes:?}");
        // ...while a flow refers to one of them, and drops after the last
        // is freed.
        let still = r.retired().iter().next().copied().unwrap();
        let writes = r.collect_retired(&HashSet::from([still]));
        assert!(!writes.iter().any(|w| matches!(w, MapWrite::SetNatServices { .. })), "{writes:?}");
        let writes = r.collect_retired(&HashSet::new());
        let clear = writes.iter().position(|w| matches!(w, MapWrite::ClearBackend { id } if *id == still)).unwrap();
        let count = writes.iter().position(|w| matches!(w, MapWrite::SetNatServices { count: 0 })).unwrap();
        assert!(clear < count, "{writes:?}");
    }

    #[test]
    fn adopting_a_nat_service_keeps_its_slots_and_writes_nothing() {
        let desired = [nat("web", &[(11, 8080), (12, 8080)]), service_on("dns", 53, &[(21, 1)])];
        let (before, maps) = maps_after(&desired);
        let mut adopted = Reconciler::adopt(RING, 4, &maps, &names_and_keys(&desired));
        for n in [11, 12] {
            let a = BackendAddress { ip: IpAddr::from([198, 18, 1, n]), port: Some(8080) };
            assert_eq!(adopted.backend_id("web", a), before.backend_id("web", a));
            assert!(adopted.backend_id("web", a).is_some());
        }
        let (writes, errors) = adopted.plan(&desired);
        assert!(writes.is_empty() && errors.is_empty(), "{writes:?}");
    }

    #[test]
    fn least_conn_corrections_bring_counts_to_the_scan() {
        let mut r = Reconciler::new(RING, 4);
        let mut desired = service("web", &[(11, 1), (12, 1)]);
        desired.scheduler = Scheduler::LeastConn;
        r.plan(&[desired, service_on("dns", 53, &[(21, 1)])]);
        let (a, b) = (
            r.backend_id("web", backend_address([198, 18, 1, 11])).unwrap(),
            r.backend_id("web", backend_address([198, 18, 1, 12])).unwrap(),
        );
        // The data plane counted 10 and 4; the table holds 7 and 4 (3 evicted).
        let scanned = std::collections::HashMap::from([(a, 7), (b, 4)]);
        let counted = std::collections::HashMap::from([(a, (10, 0)), (b, (4, 0))]);
        assert_eq!(
            r.active_corrections(&scanned, &counted),
            vec![MapWrite::SetActiveCorrection { id: a, correction: -3 }]
        );
        // Already corrected: nothing to write. Only least_conn backends are considered.
        let counted = std::collections::HashMap::from([(a, (10, -3)), (b, (4, 0))]);
        assert!(r.active_corrections(&scanned, &counted).is_empty());
        assert_eq!(r.least_conn_backends().len(), 2);
    }

    #[test]
    fn wildcard_vips_are_announced_before_and_withdrawn_after() {
        let mut r = Reconciler::new(RING, 4);
        let (writes, _) = r.plan(&[service_on("any", 0, &[(11, 1)])]);
        assert_eq!(writes[0], MapWrite::SetWildcardVips { count: 1 }, "{writes:?}");
        // Unrelated changes write no count.
        let (writes, _) = r.plan(&[service_on("any", 0, &[(11, 2)])]);
        assert!(!writes.iter().any(|w| matches!(w, MapWrite::SetWildcardVips { .. })), "{writes:?}");
        let (writes, _) = r.plan(&[]);
        assert_eq!(writes.last(), Some(&MapWrite::SetWildcardVips { count: 0 }), "{writes:?}");
        let remove_at = writes.iter().position(|w| matches!(w, MapWrite::RemoveVip { .. })).unwrap();
        assert!(remove_at < writes.len() - 1);
    }

    fn names_and_keys(desired: &[DesiredService]) -> Vec<(String, VipKey)> {
        desired.iter().map(|s| (s.name.clone(), vip_key(s))).collect()
    }

    #[test]
    fn adopting_the_same_state_keeps_every_id_and_writes_nothing() {
        let desired = [service("web", &[(11, 1), (12, 2)]), service_on("dns", 53, &[(21, 1)])];
        let (before, maps) = maps_after(&desired);
        let mut adopted = Reconciler::adopt(RING, 4, &maps, &names_and_keys(&desired));
        for (name, n) in [("web", 11), ("web", 12), ("dns", 21)] {
            let a = backend_address([198, 18, 1, n]);
            assert_eq!(adopted.backend_id(name, a), before.backend_id(name, a));
        }
        assert_eq!(adopted.vip_id("dns"), before.vip_id("dns"));
        let (writes, errors) = adopted.plan(&desired);
        assert!(writes.is_empty() && errors.is_empty(), "{writes:?}");
    }

    #[test]
    fn adopting_a_least_conn_service_writes_its_candidates_and_nothing_else() {
        // The new program's candidate map is its own, empty: only it is written.
        let mut web = service("web", &[(11, 1), (12, 2)]);
        web.scheduler = Scheduler::LeastConn;
        let desired = [web, service_on("dns", 53, &[(21, 1)])];
        let (before, maps) = maps_after(&desired);
        let mut adopted = Reconciler::adopt(RING, 4, &maps, &names_and_keys(&desired));
        let (writes, errors) = adopted.plan(&desired);
        assert!(errors.is_empty(), "{errors:?}");
        let [MapWrite::SetLeastConnCandidates { vip_id, candidates }] = writes.as_slice() else { panic!("{writes:?}") };
        assert_eq!(Some(*vip_id), before.vip_id("web"));
        assert_eq!(Some(*candidates), before.services["web"].candidates);
        assert!(adopted.plan(&desired).0.is_empty());
    }

    #[test]
    fn adopting_then_changing_reconciles_to_the_new_config() {
        let old = [service("web", &[(11, 1), (12, 1)]), service_on("dns", 53, &[(21, 1)])];
        let (before, maps) = maps_after(&old);
        // The new config dropped dns and backend 12, and added 13.
        let new = [service("web", &[(11, 1), (13, 1)])];
        let mut r = Reconciler::adopt(RING, 4, &maps, &names_and_keys(&old[..1]));
        let (writes, _) = r.plan(&new);
        assert!(
            writes.iter().any(|w| matches!(w, MapWrite::RemoveVip { key } if key.port == 53u16.to_be())),
            "{writes:?}"
        );
        let id12 = before.backend_id("web", backend_address([198, 18, 1, 12])).unwrap();
        let id21 = before.backend_id("dns", backend_address([198, 18, 1, 21])).unwrap();
        assert!(r.retired().contains(&id12) && r.retired().contains(&id21));
        let id13 = r.backend_id("web", backend_address([198, 18, 1, 13])).unwrap();
        assert!(![id12, id21].contains(&id13), "a slot that flows may use was reused");
        assert_eq!(
            r.backend_id("web", backend_address([198, 18, 1, 11])),
            before.backend_id("web", backend_address([198, 18, 1, 11]))
        );
    }

    #[test]
    fn sequence_schedulers_fill_the_front_of_the_region_and_announce_its_length() {
        let mut r = Reconciler::new(RING, 4);
        let mut desired = service("web", &[(11, 1), (12, 2), (13, 3)]);
        desired.scheduler = Scheduler::WeightedRoundRobin;
        desired.persistence_timeout_s = 30;
        let (writes, _) = r.plan(&[desired.clone()]);
        let Some(MapWrite::SetVip { info, .. }) = writes.iter().find(|w| matches!(w, MapWrite::SetVip { .. })) else {
            panic!()
        };
        assert_eq!(
            (info.scheduler, info.seq_len, info.persistence_timeout_ns),
            (scheduler::SEQUENCE, 6, 30_000_000_000)
        );
        let ring = ring_of(&r, "web");
        assert!(ring[..6].iter().all(|id| *id != 0) && ring[6..].iter().all(|id| *id == 0));
        // Shrinking to two backends: the VIP entry is written before the tail is cleared.
        desired.backends.truncate(1);
        desired.backends[0].weight = 1;
        let (writes, _) = r.plan(&[desired.clone()]);
        let vip_at = writes.iter().position(|w| matches!(w, MapWrite::SetVip { .. })).unwrap();
        let ring_at = writes.iter().position(|w| matches!(w, MapWrite::SetRingSlots { .. })).unwrap();
        assert!(vip_at < ring_at, "{writes:?}");
        // Switching to least_conn: candidates, one each.
        desired.scheduler = Scheduler::LeastConn;
        desired.backends = service("web", &[(11, 1), (12, 5)]).backends;
        r.plan(&[desired]);
        assert_eq!(r.services["web"].info.unwrap().seq_len, 2);
    }

    #[test]
    fn a_least_conn_service_gets_its_candidates_with_their_weights_before_its_vip_entry() {
        let mut r = Reconciler::new(RING, 4);
        let mut desired = service("web", &[(11, 1), (12, 5), (13, 0)]);
        desired.scheduler = Scheduler::LeastConn;
        let candidates_of = |writes: &[MapWrite]| -> Vec<(usize, LeastConnCandidates)> {
            writes
                .iter()
                .enumerate()
                .filter_map(|(at, w)| match w {
                    MapWrite::SetLeastConnCandidates { candidates, .. } => Some((at, *candidates)),
                    _ => None,
                })
                .collect()
        };
        let (writes, _) = r.plan(&[desired.clone()]);
        let written = candidates_of(&writes);
        assert_eq!(written.len(), 1, "{writes:?}");
        let (at, block) = written[0];
        let vip_at = writes.iter().position(|w| matches!(w, MapWrite::SetVip { .. })).unwrap();
        assert!(at < vip_at, "{writes:?}");
        // The weighted backends, in the ring's order, each with its weight.
        let ring = ring_of(&r, "web");
        let ids: Vec<u32> =
            [11, 12].iter().map(|n| r.backend_id("web", backend_address([198, 18, 1, *n])).unwrap()).collect();
        let id = |n: u8| ids[(n - 11) as usize];
        assert_eq!(ring[..2], [u32::from(block.ids[0]), u32::from(block.ids[1])]);
        let mut pairs: Vec<(u32, u16)> = (0..2).map(|i| (u32::from(block.ids[i]), block.weights[i])).collect();
        pairs.sort();
        assert_eq!(pairs, [(id(11), 1), (id(12), 5)]);
        assert!(block.ids[2..].iter().chain(&block.weights[2..]).all(|v| *v == 0), "{block:?}");
        // Unchanged: not written again. A weight change: written again.
        assert!(candidates_of(&r.plan(&[desired.clone()]).0).is_empty());
        desired.backends[1].weight = 3;
        let (writes, _) = r.plan(&[desired.clone()]);
        let written = candidates_of(&writes);
        assert_eq!(written.len(), 1, "{writes:?}");
        assert!((0..2).any(|i| (u32::from(written[0].1.ids[i]), written[0].1.weights[i]) == (id(12), 3)));
        // A refused write is written again by the next plan.
        for write in &writes {
            r.forget(write);
        }
        assert_eq!(candidates_of(&r.plan(&[desired.clone()]).0).len(), 1);
        // Any other scheduler: none.
        desired.scheduler = Scheduler::RoundRobin;
        assert!(candidates_of(&r.plan(&[desired]).0).is_empty());
    }

    #[test]
    fn backend_slots_carry_weight_and_eligibility() {
        let mut r = Reconciler::new(RING, 4);
        let (writes, _) = r.plan(&[service("web", &[(11, 7), (12, 0)])]);
        let slots: Vec<&Backend> = writes
            .iter()
            .filter_map(|w| if let MapWrite::SetBackend { backend, .. } = w { Some(backend) } else { None })
            .collect();
        assert_eq!((slots[0].weight, slots[0].flags & BACKEND_F_ELIGIBLE), (7, BACKEND_F_ELIGIBLE));
        assert_eq!((slots[1].weight, slots[1].flags & BACKEND_F_ELIGIBLE), (0, 0));
    }

    fn service_on(name: &str, port: u16, backends: &[(u8, u32)]) -> DesiredService {
        let mut s = service(name, backends);
        s.vip.set_port(port);
        s
    }
}
