//! Reads of the data plane's maps: counters, the connection table, and the
//! state a restarted agent adopts. Nothing here writes.

use std::collections::HashMap as StdHashMap;

use anyhow::Result;
use aya::maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray};
use lb_common::{
    BACKEND_F_IN_USE, Backend, FlowKey, FlowState, GLOBAL_COUNTER_COUNT, GlobalCounter, MAX_BACKENDS, NatFlow, NatPool,
    NatReply, TrafficCounters, VipInfo, VipKey, map_names,
};

use super::{Dataplane, planner::MapsState};

/// Both NAT tables' entries: (flows, replies).
pub type NatTables = (Vec<(FlowKey, NatFlow)>, Vec<(FlowKey, NatReply)>);

impl Dataplane {
    /// Global counters summed over CPUs, in `GlobalCounter::ALL` order.
    /// The ring of pinned flows (connection-table sync), for one reader.
    pub fn take_flow_events(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map_names::FLOW_EVENTS)
            .ok_or_else(|| anyhow::anyhow!("map {} missing from object", map_names::FLOW_EVENTS))?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }

    pub fn global_counters(&self) -> Result<Vec<(GlobalCounter, u64)>> {
        let map: PerCpuArray<&MapData, u64> = self.map(map_names::GLOBAL_COUNTERS)?;
        let mut out = Vec::with_capacity(GLOBAL_COUNTER_COUNT as usize);
        for counter in GlobalCounter::ALL {
            let values = map.get(&(counter as u32), 0)?;
            out.push((counter, values.iter().sum()));
        }
        Ok(out)
    }

    pub fn vip_counters(&self, vip_id: u32) -> Result<TrafficCounters> {
        self.traffic_counters(map_names::VIP_COUNTERS, vip_id)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<TrafficCounters> {
        self.traffic_counters(map_names::BACKEND_COUNTERS, backend_id)
    }

    fn traffic_counters(&self, name: &str, index: u32) -> Result<TrafficCounters> {
        let map: PerCpuArray<&MapData, TrafficCounters> = self.map(name)?;
        let values = map.get(&index, 0)?;
        Ok(values.iter().fold(TrafficCounters::default(), |mut sum, c| {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.new_flows += c.new_flows;
            sum
        }))
    }

    /// What the maps hold, for an agent adopting pinned state.
    pub fn read_state(&self) -> Result<MapsState> {
        let vips: HashMap<&MapData, VipKey, VipInfo> = self.map(map_names::VIPS)?;
        let vips: Vec<(VipKey, VipInfo)> = vips.iter().collect::<Result<_, _>>()?;
        let backends: Array<&MapData, Backend> = self.map(map_names::BACKENDS)?;
        let mut in_use = Vec::new();
        for id in 1..MAX_BACKENDS {
            let backend = backends.get(&id, 0)?;
            if backend.flags & BACKEND_F_IN_USE != 0 {
                in_use.push((id, backend));
            }
        }
        let rings = self.ring_slots()?;
        let mut ring_contents = StdHashMap::new();
        for (_, info) in &vips {
            let base = (info.id * self.params.ring_size) as usize;
            let ring = (0..self.params.ring_size as usize).map(|slot| rings.get(base + slot)).collect::<Result<_>>()?;
            ring_contents.insert(info.id, ring);
        }
        let egress: DevMapHash<&MapData> = self.map(map_names::EGRESS_DEVICES)?;
        let egress_devices = egress.keys().collect::<Result<Vec<_>, _>>()?;
        let pools: Array<&MapData, NatPool> = self.map(map_names::NAT_POOLS)?;
        let mut nat_pools = StdHashMap::new();
        for (_, info) in &vips {
            let pool = pools.get(&info.id, 0)?;
            if pool.port_count > 0 {
                nat_pools.insert(info.id, pool);
            }
        }
        let nat_services: Array<&MapData, u32> = self.map(map_names::NAT_SERVICES)?;
        let nat_services = nat_services.get(&0, 0)?;
        Ok(MapsState { vips, backends: in_use, rings: ring_contents, egress_devices, nat_pools, nat_services })
    }

    /// least_conn counts of `ids`: (what the data plane counted, correction).
    pub fn least_conn_counts(&self, ids: &[u32]) -> Result<StdHashMap<u32, (u64, i64)>> {
        let active: Array<&MapData, u64> = self.map(map_names::ACTIVE_FLOWS)?;
        let correction: Array<&MapData, i64> = self.map(map_names::ACTIVE_CORRECTION)?;
        ids.iter().map(|id| Ok((*id, (active.get(id, 0)?, correction.get(id, 0)?)))).collect()
    }

    /// Snapshots of both NAT tables (flows, replies).
    pub fn nat_tables(&self) -> Result<NatTables> {
        Ok((self.hash_table(map_names::NAT_FLOWS)?, self.hash_table(map_names::NAT_REPLIES)?))
    }

    /// Entries of `NAT_FLOWS` and of `NAT_REPLIES`.
    pub fn nat_table_sizes(&self) -> Result<(usize, usize)> {
        let (flows, replies) = self.nat_tables()?;
        Ok((flows.len(), replies.len()))
    }

    /// New flows of a NAT service (VIP id) refused for want of a source port.
    pub fn nat_exhausted(&self, vip_id: u32) -> Result<u64> {
        let map: PerCpuArray<&MapData, u64> = self.map(map_names::NAT_EXHAUSTED)?;
        Ok(map.get(&vip_id, 0)?.iter().sum())
    }

    /// A snapshot of the connection table.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowState)>> {
        self.hash_table(map_names::CONNTRACK)
    }

    /// A snapshot of the half-open table (SYNs waiting for their ACK).
    pub fn half_open_flows(&self) -> Result<Vec<(FlowKey, FlowState)>> {
        self.hash_table(map_names::HALF_OPEN)
    }

    /// Every entry of the hash map `name`, read in batches.
    fn hash_table<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> Result<Vec<(K, V)>> {
        super::batch::read_hash(self.hash_map(name)?, name)
    }
}
