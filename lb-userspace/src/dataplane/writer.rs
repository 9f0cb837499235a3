//! The one map writer: executes the planner's writes in order. At the first
//! write the kernel refuses it stops (later writes may point at what that
//! one should have written: a ring slot at a backend slot, a VIP at its
//! ring) and hands the refused write and everything after it back, so the
//! agent can `forget` them in the planner's record and retry.

use std::fmt;

use anyhow::Result;
use aya::maps::{Array, DevMapHash, HashMap, MapData};
use lb_common::{
    Backend, FlowKey, FlowState, LeastConnCandidates, NatFlow, NatPool, NatReply, VipAddressKey, VipInfo, VipKey,
    map_names,
};

use super::{Dataplane, planner::MapWrite};

/// Insert only a key that does not exist (uapi bpf.h).
const BPF_NOEXIST: u64 = 1;

/// Where writes go: the kernel's maps (`Dataplane`), or a test double.
pub trait WriteTarget {
    /// Applies one write. For `SetRingSlots`, `Err` carries how many slots
    /// were written before the failure.
    fn write(&mut self, write: &MapWrite) -> Result<(), Refused>;

    /// Applies consecutive `SetBackend` writes, at once where the target
    /// can. `Err` carries how many of them were written before the failure.
    fn set_backends(&mut self, run: &[MapWrite]) -> Result<(), Refused> {
        for (written, write) in run.iter().enumerate() {
            self.write(write).map_err(|refused| Refused { written, ..refused })?;
        }
        Ok(())
    }
}

/// Why the kernel refused a write, and how far a write of many elements
/// got (the slots of a `SetRingSlots`, the writes of a `set_backends` run).
#[derive(Debug)]
pub struct Refused {
    pub error: anyhow::Error,
    pub written: usize,
}

impl Refused {
    pub fn new(error: impl Into<anyhow::Error>) -> Self {
        Self { error: error.into(), written: 0 }
    }
}

/// A write the kernel refused, and the writes of the batch it held back.
#[derive(Debug)]
pub struct WriteFailure {
    /// Names the map and key, and the kernel's answer.
    pub message: String,
    /// The refused write (ring slots: only those not written) and every
    /// write after it, none of them applied.
    pub unapplied: Vec<MapWrite>,
}

impl std::error::Error for WriteFailure {}

impl fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} write(s) held back, retried on the next reconcile)", self.message, self.unapplied.len())
    }
}

/// Executes `writes` in order against `target` (consecutive backend writes
/// as one `set_backends` run).
pub fn apply(target: &mut impl WriteTarget, writes: &[MapWrite]) -> Result<(), WriteFailure> {
    let is_backend = |w: &MapWrite| matches!(w, MapWrite::SetBackend { .. });
    let mut i = 0;
    while i < writes.len() {
        let run = writes[i..].iter().take_while(|w| is_backend(w)).count();
        let result = if run > 1 { target.set_backends(&writes[i..i + run]) } else { target.write(&writes[i]) };
        let Err(refused) = result else {
            i += run.max(1);
            continue;
        };
        // The refused write: a run's first unwritten backend.
        let at = if run > 1 { i + refused.written.min(run - 1) } else { i };
        let write = &writes[at];
        let mut unapplied = Vec::with_capacity(writes.len() - at);
        unapplied.push(match write {
            MapWrite::SetRingSlots { vip_id, slots } => {
                MapWrite::SetRingSlots { vip_id: *vip_id, slots: slots[refused.written.min(slots.len())..].to_vec() }
            }
            other => other.clone(),
        });
        unapplied.extend_from_slice(&writes[at + 1..]);
        return Err(WriteFailure { message: format!("{}: {:#}", describe(write), refused.error), unapplied });
    }
    Ok(())
}

impl WriteTarget for Dataplane {
    fn write(&mut self, write: &MapWrite) -> Result<(), Refused> {
        #[cfg(feature = "test-hooks")]
        refuse_if_asked()?;
        match write {
            MapWrite::SetRingSlots { vip_id, slots } => {
                self.ring_writes += 1;
                let base = vip_id * self.params.ring_size;
                let mut table = self.ring_slots().map_err(Refused::new)?;
                for (written, (slot, backend_id)) in slots.iter().enumerate() {
                    table.set((base + slot) as usize, *backend_id).map_err(|error| Refused { error, written })?;
                }
                Ok(())
            }
            other => self.write_one(other).map_err(Refused::new),
        }
    }

    /// One `BPF_MAP_UPDATE_BATCH` for the run.
    fn set_backends(&mut self, run: &[MapWrite]) -> Result<(), Refused> {
        #[cfg(feature = "test-hooks")]
        refuse_if_asked()?;
        use std::os::fd::AsFd as _;
        let (ids, backends): (Vec<u32>, Vec<Backend>) = run
            .iter()
            .filter_map(|w| match w {
                MapWrite::SetBackend { id, backend } => Some((*id, *backend)),
                _ => None,
            })
            .unzip();
        if ids.len() != run.len() {
            return Err(Refused::new(anyhow::anyhow!("a backend run holds another kind of write")));
        }
        let name = map_names::BACKENDS;
        let Some(aya::maps::Map::Array(data)) = self.ebpf.map(name) else {
            return Err(Refused::new(anyhow::anyhow!("map {name} missing from object")));
        };
        match super::batch::update_array(data.fd().as_fd(), &ids, &backends) {
            Ok(()) => Ok(()),
            // Refused before any element: a kernel without batch operations
            // on arrays (before 5.6), or the first backend itself. One write
            // per backend tells which, and names the backend if it is one.
            Err((0, _)) => {
                for (written, write) in run.iter().enumerate() {
                    self.write_one(write).map_err(|error| Refused { error, written })?;
                }
                Ok(())
            }
            Err((written, error)) => Err(Refused { error: error.into(), written }),
        }
    }
}

/// Test builds only (`--features test-hooks`, as `cargo xtask test` builds):
/// while the file named by `XDPLB_TEST_REFUSE_MAP_WRITES` exists, every map
/// write is refused, so end-to-end tests can watch a refusal be reported
/// and retried. Production builds have no such hook.
#[cfg(feature = "test-hooks")]
fn refuse_if_asked() -> Result<(), Refused> {
    match std::env::var_os("XDPLB_TEST_REFUSE_MAP_WRITES") {
        Some(flag) if std::path::Path::new(&flag).exists() => {
            Err(Refused::new(anyhow::anyhow!("refused by the test hook")))
        }
        _ => Ok(()),
    }
}

impl Dataplane {
    fn write_one(&mut self, write: &MapWrite) -> Result<()> {
        match write {
            MapWrite::AddEgressDevice { ifindex } => {
                let mut map: DevMapHash<&mut MapData> = self.map_mut(map_names::EGRESS_DEVICES)?;
                map.insert(*ifindex, *ifindex, None, 0)?;
            }
            MapWrite::SetBackend { id, backend } => {
                let mut map: Array<&mut MapData, Backend> = self.map_mut(map_names::BACKENDS)?;
                map.set(*id, backend, 0)?;
            }
            MapWrite::ClearBackend { id } => {
                let mut map: Array<&mut MapData, Backend> = self.map_mut(map_names::BACKENDS)?;
                map.set(*id, Backend::default(), 0)?;
                // A free slot starts its next life with no flows counted.
                let mut active: Array<&mut MapData, u64> = self.map_mut(map_names::ACTIVE_FLOWS)?;
                active.set(*id, 0, 0)?;
                let mut correction: Array<&mut MapData, i64> = self.map_mut(map_names::ACTIVE_CORRECTION)?;
                correction.set(*id, 0, 0)?;
            }
            MapWrite::SetWildcardVips { count } => {
                let mut map: Array<&mut MapData, u32> = self.map_mut(map_names::WILDCARD_VIPS)?;
                map.set(0, count, 0)?;
            }
            MapWrite::SetActiveCorrection { id, correction } => {
                let mut map: Array<&mut MapData, i64> = self.map_mut(map_names::ACTIVE_CORRECTION)?;
                map.set(*id, correction, 0)?;
            }
            MapWrite::SetNatPool { vip_id, pool } => {
                let mut map: Array<&mut MapData, NatPool> = self.map_mut(map_names::NAT_POOLS)?;
                map.set(*vip_id, pool, 0)?;
            }
            MapWrite::SetLeastConnCandidates { vip_id, candidates } => {
                let mut map: Array<&mut MapData, LeastConnCandidates> =
                    self.map_mut(map_names::LEAST_CONN_CANDIDATES)?;
                map.set(*vip_id, candidates, 0)?;
            }
            MapWrite::SetNatServices { count } => {
                let mut map: Array<&mut MapData, u32> = self.map_mut(map_names::NAT_SERVICES)?;
                map.set(0, count, 0)?;
            }
            MapWrite::RemoveNatFlow { key } => {
                let mut map: HashMap<&mut MapData, FlowKey, NatFlow> = self.map_mut(map_names::NAT_FLOWS)?;
                ignore_missing(map.remove(key))?;
            }
            MapWrite::RemoveNatReply { key } => {
                let mut map: HashMap<&mut MapData, FlowKey, NatReply> = self.map_mut(map_names::NAT_REPLIES)?;
                ignore_missing(map.remove(key))?;
            }
            MapWrite::AdoptFlow { key, state } => {
                let mut map: HashMap<&mut MapData, FlowKey, FlowState> = self.map_mut(map_names::CONNTRACK)?;
                match map.insert(key, state, BPF_NOEXIST) {
                    Err(aya::maps::MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(nix::errno::Errno::EEXIST as i32) => {}
                    other => other?,
                }
            }
            MapWrite::SetRingSlots { .. } => unreachable!("written slot by slot in `write`"),
            MapWrite::SetVip { key, info } => {
                let mut map: HashMap<&mut MapData, VipKey, VipInfo> = self.map_mut(map_names::VIPS)?;
                map.insert(key, info, 0)?;
            }
            MapWrite::RemoveVip { key } => {
                let mut map: HashMap<&mut MapData, VipKey, VipInfo> = self.map_mut(map_names::VIPS)?;
                map.remove(key)?;
            }
            MapWrite::AddVipAddress { key } => {
                let mut map: HashMap<&mut MapData, VipAddressKey, u32> = self.map_mut(map_names::VIP_ADDRESSES)?;
                map.insert(key, 1, 0)?;
            }
            MapWrite::RemoveVipAddress { key } => {
                let mut map: HashMap<&mut MapData, VipAddressKey, u32> = self.map_mut(map_names::VIP_ADDRESSES)?;
                map.remove(key)?;
            }
        }
        Ok(())
    }
}

/// A removal of what is already gone has done its job.
fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// The map and key a write goes to, for logs and `xdplb status`.
pub fn describe(write: &MapWrite) -> String {
    let vip = |key: &VipKey| {
        let address = super::planner::words_address(key.addr, key.family);
        format!("{address} port {} proto {}", u16::from_be(key.port), key.proto)
    };
    let flow = |key: &FlowKey| {
        let (src, dst) =
            (super::planner::words_address(key.src, key.family), super::planner::words_address(key.dst, key.family));
        format!("{src}:{} → {dst}:{} proto {}", u16::from_be(key.sport), u16::from_be(key.dport), key.proto)
    };
    match write {
        MapWrite::AddEgressDevice { ifindex } => format!("{} insert ifindex {ifindex}", map_names::EGRESS_DEVICES),
        MapWrite::SetBackend { id, .. } => format!("{} set id {id}", map_names::BACKENDS),
        MapWrite::ClearBackend { id } => format!("{} clear id {id}", map_names::BACKENDS),
        MapWrite::SetRingSlots { vip_id, slots } => {
            format!("{} set {} slot(s) of VIP id {vip_id}", map_names::RING_SLOTS, slots.len())
        }
        MapWrite::SetVip { key, info } => format!("{} insert {} (id {})", map_names::VIPS, vip(key), info.id),
        MapWrite::RemoveVip { key } => format!("{} remove {}", map_names::VIPS, vip(key)),
        MapWrite::AddVipAddress { key } => {
            format!("{} insert {}", map_names::VIP_ADDRESSES, super::planner::words_address(key.addr, key.family))
        }
        MapWrite::RemoveVipAddress { key } => {
            format!("{} remove {}", map_names::VIP_ADDRESSES, super::planner::words_address(key.addr, key.family))
        }
        MapWrite::SetActiveCorrection { id, .. } => format!("{} set id {id}", map_names::ACTIVE_CORRECTION),
        MapWrite::SetWildcardVips { count } => format!("{} set count {count}", map_names::WILDCARD_VIPS),
        MapWrite::SetNatPool { vip_id, .. } => format!("{} set VIP id {vip_id}", map_names::NAT_POOLS),
        MapWrite::SetLeastConnCandidates { vip_id, .. } => {
            format!("{} set VIP id {vip_id}", map_names::LEAST_CONN_CANDIDATES)
        }
        MapWrite::SetNatServices { count } => format!("{} set count {count}", map_names::NAT_SERVICES),
        MapWrite::RemoveNatFlow { key } => format!("{} remove {}", map_names::NAT_FLOWS, flow(key)),
        MapWrite::RemoveNatReply { key } => format!("{} remove {}", map_names::NAT_REPLIES, flow(key)),
        MapWrite::AdoptFlow { key, state } => {
            format!("{} insert {} (a peer's, backend id {})", map_names::CONNTRACK, flow(key), state.backend_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    use super::*;
    use crate::{
        config::Protocol,
        dataplane::planner::Reconciler,
        netlink::L2Path,
        state::{DesiredBackend, DesiredService},
    };

    const RING: u32 = 31;

    /// The maps as cells in memory; refuses the `fail_at`-th write (counted
    /// from 0 over its life), a ring write after half its slots.
    #[derive(Default)]
    struct FakeMaps {
        egress: BTreeSet<u32>,
        backends: BTreeMap<u32, Backend>,
        rings: BTreeMap<u32, u32>,
        vips: BTreeMap<VipKey, VipInfo>,
        vip_addresses: BTreeSet<VipAddressKey>,
        wildcards: u32,
        writes_seen: usize,
        fail_at: Option<usize>,
    }

    impl FakeMaps {
        fn cells(&self) -> String {
            let rings: Vec<_> = self.rings.iter().filter(|(_, id)| **id != 0).collect();
            format!(
                "{:?}\n{:?}\n{rings:?}\n{:?}\n{:?}\n{}",
                self.egress, self.backends, self.vips, self.vip_addresses, self.wildcards
            )
        }
    }

    impl WriteTarget for FakeMaps {
        fn write(&mut self, write: &MapWrite) -> Result<(), Refused> {
            let failing = self.fail_at == Some(self.writes_seen);
            self.writes_seen += 1;
            if failing && !matches!(write, MapWrite::SetRingSlots { .. }) {
                return Err(Refused::new(anyhow::anyhow!("injected failure")));
            }
            match write {
                MapWrite::AddEgressDevice { ifindex } => {
                    self.egress.insert(*ifindex);
                }
                MapWrite::SetBackend { id, backend } => {
                    self.backends.insert(*id, *backend);
                }
                MapWrite::ClearBackend { id } => {
                    self.backends.remove(id);
                }
                MapWrite::SetRingSlots { vip_id, slots } => {
                    let written = if failing { slots.len() / 2 } else { slots.len() };
                    for (slot, id) in &slots[..written] {
                        self.rings.insert(vip_id * RING + slot, *id);
                    }
                    if failing {
                        return Err(Refused { error: anyhow::anyhow!("injected failure"), written });
                    }
                }
                MapWrite::SetVip { key, info } => {
                    self.vips.insert(*key, *info);
                }
                MapWrite::RemoveVip { key } => {
                    self.vips.remove(key);
                }
                MapWrite::AddVipAddress { key } => {
                    self.vip_addresses.insert(*key);
                }
                MapWrite::RemoveVipAddress { key } => {
                    self.vip_addresses.remove(key);
                }
                MapWrite::SetActiveCorrection { .. } => {}
                MapWrite::SetWildcardVips { count } => self.wildcards = *count,
                MapWrite::SetNatPool { .. }
                | MapWrite::SetLeastConnCandidates { .. }
                | MapWrite::SetNatServices { .. }
                | MapWrite::RemoveNatFlow { .. }
                | MapWrite::RemoveNatReply { .. }
                | MapWrite::AdoptFlow { .. } => {}
            }
            Ok(())
        }
    }

    fn service(name: &str, vip: &str, backends: &[(u8, u32)]) -> DesiredService {
        let backends = backends
            .iter()
            .map(|(n, weight)| DesiredBackend {
                address: std::net::IpAddr::from([198, 18, 1, *n]).into(),
                weight: *weight,
                path: Some(L2Path {
                    ifindex: 10 + *n as u32 % 3,
                    src_mac: [2; 6],
                    dst_mac: [2, 0, 0, 0, 1, *n],
                    mtu: 1500,
                    source: None,
                }),
                down: false,
            })
            .collect();
        DesiredService::dsr(name, vip.parse().unwrap(), Protocol::Tcp, backends)
    }

    /// Plans and applies `desired` as the agent does, retrying after a
    /// refusal (each plan is one reconcile); returns how many reconciles it took.
    fn reconcile(r: &mut Reconciler, maps: &mut FakeMaps, desired: &[DesiredService]) -> usize {
        for attempt in 1..=5 {
            let (writes, errors) = r.plan(desired);
            assert!(errors.is_empty(), "{errors:?}");
            match apply(maps, &writes) {
                Ok(()) => return attempt,
                Err(failure) => {
                    assert!(failure.message.contains("injected failure"), "{failure}");
                    for write in &failure.unapplied {
                        r.forget(write);
                    }
                }
            }
        }
        panic!("no convergence after 5 reconciles")
    }

    fn collect(r: &mut Reconciler, maps: &mut FakeMaps) {
        let writes = r.collect_retired(&HashSet::new());
        if let Err(failure) = apply(maps, &writes) {
            for write in &failure.unapplied {
                r.forget(write);
            }
            let again = r.collect_retired(&HashSet::new());
            assert!(!again.is_empty(), "a refused clear is collected again");
            apply(maps, &again).unwrap();
        }
    }

    fn scenario(maps: &mut FakeMaps) -> usize {
        let mut r = Reconciler::new(RING, 4);
        let first = [
            service("web", "198.18.0.100:80", &[(11, 1), (12, 1), (13, 2)]),
            service("any", "198.18.0.101:0", &[(21, 1)]),
        ];
        let second = [service("web", "198.18.0.100:80", &[(11, 3), (13, 2), (14, 1)])];
        let mut reconciles = reconcile(&mut r, maps, &first);
        reconciles += reconcile(&mut r, maps, &second);
        collect(&mut r, maps);
        // Nothing left to write once converged.
        assert_eq!(r.plan(&second).0, vec![], "the record matches the maps");
        reconciles
    }

    /// A target that writes backend runs at once, as the kernel's batch
    /// does: it refuses the run's element `fail_at`, after writing those
    /// before it.
    struct BatchMaps {
        inner: FakeMaps,
        runs: Vec<usize>,
        fail_at: Option<usize>,
    }

    impl WriteTarget for BatchMaps {
        fn write(&mut self, write: &MapWrite) -> Result<(), Refused> {
            self.inner.write(write)
        }

        fn set_backends(&mut self, run: &[MapWrite]) -> Result<(), Refused> {
            self.runs.push(run.len());
            let written = self.fail_at.take().unwrap_or(run.len()).min(run.len());
            for write in &run[..written] {
                self.inner.write(write)?;
            }
            if written < run.len() {
                return Err(Refused { error: anyhow::anyhow!("injected failure"), written });
            }
            Ok(())
        }
    }

    #[test]
    fn consecutive_backend_writes_go_as_one_run_and_a_refusal_inside_it_holds_back_the_rest() {
        let mut r = Reconciler::new(RING, 4);
        let web = service("web", "198.18.0.100:80", &[(11, 1), (12, 1), (13, 2), (14, 1)]);
        let (writes, errors) = r.plan(std::slice::from_ref(&web));
        assert!(errors.is_empty(), "{errors:?}");
        let backend_writes: Vec<&MapWrite> =
            writes.iter().filter(|w| matches!(w, MapWrite::SetBackend { .. })).collect();
        assert_eq!(backend_writes.len(), 4);

        let mut whole = BatchMaps { inner: FakeMaps::default(), runs: vec![], fail_at: None };
        apply(&mut whole, &writes).unwrap();
        assert_eq!(whole.runs, vec![4], "the four backends in one run");

        let mut refused = BatchMaps { inner: FakeMaps::default(), runs: vec![], fail_at: Some(2) };
        let failure = apply(&mut refused, &writes).unwrap_err();
        assert_eq!(refused.inner.backends.len(), 2, "the two before the refusal are written");
        assert_eq!(&failure.unapplied[0], backend_writes[2], "the refused backend is the first held back");
        let first_held = writes.iter().position(|w| w == backend_writes[2]).unwrap();
        assert_eq!(failure.unapplied, writes[first_held..].to_vec(), "it and everything after it");
        assert!(failure.message.contains("injected failure"), "{}", failure.message);
    }

    #[test]
    fn a_refused_write_is_retried_until_the_maps_match() {
        let mut reference = FakeMaps::default();
        assert_eq!(scenario(&mut reference), 2);
        let total = reference.writes_seen;
        assert!(total > 10);
        // Refuse each write of the scenario in turn (every kind, every position).
        for fail_at in 0..total {
            let mut maps = FakeMaps { fail_at: Some(fail_at), ..Default::default() };
            let reconciles = scenario(&mut maps);
            assert_eq!(maps.cells(), reference.cells(), "refusing write {fail_at}");
            assert!(reconciles <= 3, "refusing write {fail_at}: {reconciles} reconciles");
        }
    }
}
