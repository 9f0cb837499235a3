//! The kernel side of the agent: loads the embedded XDP program, attaches it,
//! and executes the reconciler's map writes. Only `apply` writes maps.

use std::collections::HashSet;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    Backend, FLOW_F_FINISHED, FlowKey, FlowState, GLOBAL_COUNTER_COUNT, GlobalCounter, PROTO_UDP,
    TrafficCounters, VipAddressKey, VipInfo, VipKey, names,
};

use crate::reconcile::MapWrite;

/// The XDP object built by build.rs from `lb-ebpf`.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Load-time parameters of the data plane.
#[derive(Clone, Copy, Debug)]
pub struct DataplaneParams {
    pub ring_size: u32,
    pub max_services: u32,
    pub conntrack_size: u32,
    pub udp_idle_timeout_ns: u64,
}

pub struct Dataplane {
    ebpf: Ebpf,
    params: DataplaneParams,
    attached: Option<XdpLinkId>,
}

impl Dataplane {
    /// Loads the program and creates its maps (nothing is attached yet).
    pub fn load(params: DataplaneParams) -> Result<Self> {
        let ring_entries = params
            .ring_size
            .checked_mul(params.max_services)
            .ok_or_else(|| anyhow!("ring_size × max_services overflows"))?;
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_RING_SIZE, &params.ring_size, true)
            .override_global(
                names::GLOBAL_UDP_IDLE_TIMEOUT_NS,
                &params.udp_idle_timeout_ns,
                true,
            )
            .map_max_entries(names::RINGS, ring_entries)
            .map_max_entries(names::CONNTRACK, params.conntrack_size)
            .load(XDP_OBJECT)
            .context("loading the XDP object (are you root, with BPF support?)")?;
        let program: &mut Xdp = ebpf
            .program_mut(names::PROGRAM)
            .ok_or_else(|| anyhow!("program {} missing from object", names::PROGRAM))?
            .try_into()?;
        program.load().context("verifying the XDP program")?;
        Ok(Self {
            ebpf,
            params,
            attached: None,
        })
    }

    pub fn params(&self) -> DataplaneParams {
        self.params
    }

    pub fn program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(names::PROGRAM)
            .ok_or_else(|| anyhow!("program {} missing", names::PROGRAM))?
            .try_into()?)
    }

    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(names::PROGRAM)
            .expect("loaded")
            .try_into()?;
        let link = program.attach(interface, mode).with_context(|| {
            format!(
                "attaching XDP to {interface} in {mode:?} mode (EBUSY means another XDP program, \
                     perhaps another xdplb, is attached there)"
            )
        })?;
        self.attached = Some(link);
        Ok(())
    }

    pub fn detach(&mut self) -> Result<()> {
        if let Some(link) = self.attached.take() {
            let program: &mut Xdp = self
                .ebpf
                .program_mut(names::PROGRAM)
                .expect("loaded")
                .try_into()?;
            program.detach(link)?;
        }
        Ok(())
    }

    /// Executes the writes in order. Stops at the first failure, naming it.
    pub fn apply(&mut self, writes: &[MapWrite]) -> Result<()> {
        for write in writes {
            self.apply_one(write)
                .with_context(|| format!("map write {}", describe(write)))?;
        }
        Ok(())
    }

    fn apply_one(&mut self, write: &MapWrite) -> Result<()> {
        match write {
            MapWrite::AddEgressDevice { ifindex } => {
                let mut map: DevMapHash<&mut MapData> = self.map_mut(names::EGRESS_DEVICES)?;
                map.insert(*ifindex, *ifindex, None, 0)?;
            }
            MapWrite::SetBackend { id, backend } => {
                let mut map: Array<&mut MapData, Backend> = self.map_mut(names::BACKENDS)?;
                map.set(*id, backend, 0)?;
            }
            MapWrite::ClearBackend { id } => {
                let mut map: Array<&mut MapData, Backend> = self.map_mut(names::BACKENDS)?;
                map.set(*id, Backend::default(), 0)?;
            }
            MapWrite::SetRingSlots { vip_id, slots } => {
                let base = vip_id * self.params.ring_size;
                let mut map: Array<&mut MapData, u32> = self.map_mut(names::RINGS)?;
                for (slot, backend_id) in slots {
                    map.set(base + slot, backend_id, 0)?;
                }
            }
            MapWrite::SetVip { key, info } => {
                let mut map: HashMap<&mut MapData, VipKey, VipInfo> = self.map_mut(names::VIPS)?;
                map.insert(key, info, 0)?;
            }
            MapWrite::RemoveVip { key } => {
                let mut map: HashMap<&mut MapData, VipKey, VipInfo> = self.map_mut(names::VIPS)?;
                map.remove(key)?;
            }
            MapWrite::AddVipAddress { key } => {
                let mut map: HashMap<&mut MapData, VipAddressKey, u32> =
                    self.map_mut(names::VIP_ADDRESSES)?;
                map.insert(key, 1, 0)?;
            }
            MapWrite::RemoveVipAddress { key } => {
                let mut map: HashMap<&mut MapData, VipAddressKey, u32> =
                    self.map_mut(names::VIP_ADDRESSES)?;
                map.remove(key)?;
            }
        }
        Ok(())
    }

    fn map_mut<'a, T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>>(
        &'a mut self,
        name: &str,
    ) -> Result<T> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from object"))?;
        Ok(T::try_from(map)?)
    }

    fn map<'a, T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>>(
        &'a self,
        name: &str,
    ) -> Result<T> {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from object"))?;
        Ok(T::try_from(map)?)
    }

    /// Global counters summed over CPUs, in `GlobalCounter::ALL` order.
    pub fn global_counters(&self) -> Result<Vec<(GlobalCounter, u64)>> {
        let map: PerCpuArray<&MapData, u64> = self.map(names::GLOBAL_COUNTERS)?;
        let mut out = Vec::with_capacity(GLOBAL_COUNTER_COUNT as usize);
        for counter in GlobalCounter::ALL {
            let values = map.get(&(counter as u32), 0)?;
            out.push((counter, values.iter().sum()));
        }
        Ok(out)
    }

    pub fn vip_counters(&self, vip_id: u32) -> Result<TrafficCounters> {
        self.traffic_counters(names::VIP_COUNTERS, vip_id)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<TrafficCounters> {
        self.traffic_counters(names::BACKEND_COUNTERS, backend_id)
    }

    fn traffic_counters(&self, name: &str, index: u32) -> Result<TrafficCounters> {
        let map: PerCpuArray<&MapData, TrafficCounters> = self.map(name)?;
        let values = map.get(&index, 0)?;
        Ok(values
            .iter()
            .fold(TrafficCounters::default(), |mut sum, c| {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
                sum.new_flows += c.new_flows;
                sum
            }))
    }

    /// One pass over the connection table: active flows per backend id, and
    /// the ids some live entry may still send to.
    pub fn scan_flows(&self, tcp_idle_timeout_ns: u64) -> Result<FlowScan> {
        let now = monotonic_coarse_ns();
        let mut scan = FlowScan::default();
        for (key, state) in self.flows()? {
            let idle = now.saturating_sub(state.last_seen_ns);
            let (timeout, finished) = if key.proto == PROTO_UDP {
                (self.params.udp_idle_timeout_ns, false)
            } else {
                (tcp_idle_timeout_ns, state.flags & FLOW_F_FINISHED != 0)
            };
            if key.proto == PROTO_UDP && idle > timeout {
                continue; // the data plane schedules it afresh
            }
            if !finished || idle < FINISHED_LINGER_NS {
                scan.referenced.insert(state.backend_id);
            }
            if !finished && idle <= timeout {
                *scan.active.entry(state.backend_id).or_insert(0) += 1;
            }
        }
        Ok(scan)
    }
}

/// A finished TCP flow may still see its last ACKs for a moment.
const FINISHED_LINGER_NS: u64 = 10_000_000_000;

#[derive(Debug, Default)]
pub struct FlowScan {
    pub active: std::collections::HashMap<u32, u64>,
    pub referenced: HashSet<u32>,
}

impl Dataplane {
    /// A snapshot of the connection table.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowState)>> {
        let map: HashMap<&MapData, FlowKey, FlowState> = self.map(names::CONNTRACK)?;
        Ok(map.iter().collect::<Result<_, _>>()?)
    }
}

/// The clock `bpf_ktime_get_coarse_ns` reads.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn describe(write: &MapWrite) -> String {
    match write {
        MapWrite::AddEgressDevice { ifindex } => format!("add egress device {ifindex}"),
        MapWrite::SetBackend { id, .. } => format!("set backend {id}"),
        MapWrite::ClearBackend { id } => format!("clear backend {id}"),
        MapWrite::SetRingSlots { vip_id, slots } => {
            format!("set {} ring slots of VIP {vip_id}", slots.len())
        }
        MapWrite::SetVip { info, .. } => format!("set VIP {}", info.id),
        MapWrite::RemoveVip { .. } => "remove VIP".into(),
        MapWrite::AddVipAddress { .. } => "add VIP address".into(),
        MapWrite::RemoveVipAddress { .. } => "remove VIP address".into(),
    }
}
