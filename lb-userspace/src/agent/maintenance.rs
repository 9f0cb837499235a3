//! The periodic pass: neighbour resolution, the connection-table scan
//! (active flows, drains, retired slots, least_conn corrections), and a
//! reconcile that retries any refused map write.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use super::*;
use crate::dataplane::scanner::{FlowTimeouts, ScanRequest, TableScan};

impl Agent {
    /// Resolves every configured backend's L2 path. Only a backend seen for
    /// the first time is waited for (`first_wait` at most); one that stays
    /// unresolved costs the event loop nothing more: its resolution is
    /// requested again each pass and arrives as a neighbour event.
    pub(super) async fn resolve_within(&mut self, first_wait: Duration) {
        let addresses: Vec<IpAddr> = self
            .config
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.address.get_ref().ip))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let new: std::collections::HashSet<IpAddr> =
            addresses.iter().filter(|a| !self.awaited.contains(*a)).copied().collect();
        self.awaited = addresses.iter().copied().collect();
        let results = self.netlink.resolve_all(&addresses, &new, first_wait).await;
        let was_unresolved = self.unresolved;
        self.unresolved = false;
        self.paths.clear();
        for (address, result) in results {
            match result {
                Ok(path) => {
                    self.paths.insert(address, path);
                }
                Err(err) => {
                    log::warn!("backend {address} unreachable, left out until resolved: {err}");
                    self.unresolved = true;
                }
            }
        }
        if was_unresolved && !self.unresolved {
            log::info!("all backends resolved");
        }
    }

    /// `resolve_within` as the event loop may: briefly, for new backends only.
    pub(super) async fn resolve(&mut self) {
        self.resolve_within(FIRST_RESOLVE_WAIT).await;
    }

    /// The periodic pass. The table scan it asks for runs on the scanning
    /// thread; its result comes back as `on_table_scan`.
    pub(super) async fn maintain(&mut self) {
        self.last_maintenance = tokio::time::Instant::now();
        self.resolve().await;
        self.attach_probe_tunnels().await;
        let agent = &self.config.agent;
        let request = ScanRequest {
            flows: FlowTimeouts { tcp_idle_ns: agent.tcp_idle_ns(), udp_idle_ns: agent.udp_idle_ns() },
            rings: self.reconciler.ring_checks(),
            // While NAT slots exist (a retired one's flows still expire), and
            // once more after the last is freed: its flows' leftovers go too.
            nat: (!self.reconciler.nat_interfaces().is_empty() || !self.nat.translations.is_empty())
                .then(|| self.nat_timeouts()),
        };
        self.scanner.request(&self.dataplane, request);
        self.log_exhausted_pools();
        self.reconcile_logged();
    }

    /// A table scan's result: active flows, drains, retired slots,
    /// least_conn corrections and NAT expiry, written by the one writer.
    pub(super) fn on_table_scan(&mut self, scan: TableScan) {
        self.scanner.finished();
        log::debug!("table scan took {:?}", scan.took);
        match scan.flows {
            Ok(flows) => {
                self.update_active_flows(&flows.active);
                for (service, address, why) in self.runtime.advance_drains(&self.config, Instant::now()) {
                    log::info!("service {service}: backend {address} drained ({why})");
                }
                let mut writes = self.reconciler.collect_retired(&flows.referenced);
                let least_conn = self.reconciler.least_conn_backends();
                if !least_conn.is_empty() {
                    match self.dataplane.least_conn_counts(&least_conn) {
                        Ok(counted) => writes.extend(self.reconciler.active_corrections(&flows.active, &counted)),
                        Err(err) => log::error!("reading least_conn counts: {err:#}"),
                    }
                }
                let freed = writes.iter().any(|w| matches!(w, MapWrite::ClearBackend { .. }));
                if let Err(err) = self.apply_writes(&writes) {
                    log::error!("maintenance: {err:#}");
                }
                if freed {
                    // The last retired NAT slot may be gone: so are its replies.
                    self.sync_reply_interfaces();
                }
                if self.reconciler.set_pins_follow(&flows.follow_ring) {
                    // A service's SYNs start or stop skipping the connection table.
                    self.reconcile_logged();
                }
            }
            Err(err) => log::error!("scanning the connection table: {err}"),
        }
        match scan.nat {
            Some(Ok(upkeep)) => self.on_nat_scan(upkeep),
            Some(Err(err)) => log::error!("scanning the NAT tables: {err}"),
            None => {}
        }
    }

    pub(super) fn update_active_flows(&mut self, active: &HashMap<u32, u64>) {
        for ((service, address), state) in &mut self.runtime.backends {
            let id = self.reconciler.backend_id(service, *address);
            state.active_flows = id.and_then(|id| active.get(&id)).copied().unwrap_or(0);
        }
    }
}
