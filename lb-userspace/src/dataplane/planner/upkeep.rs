//! Writes that come from the connection-table scan rather than from the
//! desired state: freeing retired backend slots, correcting least_conn counts.

use std::collections::HashSet;

use lb_common::{VIP_F_NAT_FLOWS_LINGER, scheduler};

use super::*;

impl Reconciler {
    /// Ids of the backends of least_conn services.
    pub fn least_conn_backends(&self) -> Vec<u32> {
        self.services
            .values()
            .filter(|s| s.info.is_some_and(|i| i.scheduler == scheduler::LEAST_CONN))
            .flat_map(|s| s.backends.values().copied())
            .collect()
    }

    /// Corrections that make the data plane's least_conn counts equal the
    /// scan's (LRU evictions and idle expiry are invisible to the data plane).
    pub fn active_corrections(
        &self,
        scanned: &std::collections::HashMap<u32, u64>,
        counted: &std::collections::HashMap<u32, (u64, i64)>,
    ) -> Vec<MapWrite> {
        let mut writes = Vec::new();
        for id in self.least_conn_backends() {
            let (raw, current) = counted.get(&id).copied().unwrap_or((0, 0));
            let correction = *scanned.get(&id).unwrap_or(&0) as i64 - raw as i64;
            if correction != current {
                writes.push(MapWrite::SetActiveCorrection { id, correction });
            }
        }
        writes
    }

    /// Frees retired backend slots that no connection-table entry refers to
    /// (and lowers the NAT count once no retired NAT slot is left; a VIP
    /// whose last retired NAT slot went stops looking for its translations).
    pub fn collect_retired(&mut self, referenced: &HashSet<u32>) -> Vec<MapWrite> {
        let free: Vec<u32> = self.retired.iter().filter(|id| !referenced.contains(id)).copied().collect();
        let mut writes = Vec::new();
        for id in free {
            self.retired.remove(&id);
            self.backends.remove(&id);
            self.free_backend_ids.push(id);
            writes.push(MapWrite::ClearBackend { id });
        }
        let ended: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| {
                s.info.is_some_and(|info| info.flags & VIP_F_NAT_FLOWS_LINGER != 0) && !self.nat_flows_linger(s.vip_id)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in ended {
            let service = self.services.get_mut(&name).expect("listed above");
            let Some(info) = service.info.as_mut() else { continue };
            info.flags &= !VIP_F_NAT_FLOWS_LINGER;
            writes.push(MapWrite::SetVip { key: service.key, info: *info });
        }
        self.lower_nat_services(&mut writes);
        writes
    }
}
