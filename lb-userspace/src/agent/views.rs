//! What the agent shows: `status`, the Prometheus scrape, the exit summary.

use std::{collections::BTreeMap, time::SystemTime};

use anyhow::Result;

use super::*;
use crate::control::Health;

impl Agent {
    /// Active flows come from the last maintenance scan (every 1–5 s): a
    /// status call, a `top` refresh or a scrape must not walk the whole
    /// connection table again.
    pub(super) fn status(&mut self) -> Result<Status> {
        let ring_weights: BTreeMap<(&str, BackendAddress), u32> = self
            .desired
            .iter()
            .flat_map(|s| s.backends.iter().map(move |b| ((s.name.as_str(), b.address), b.weight)))
            .collect();
        let now = SystemTime::now();
        let least_conn = self.dataplane.least_conn_counts(&self.reconciler.least_conn_backends())?;
        let mut services = Vec::new();
        for service in &self.config.services {
            let name = service.name.get_ref();
            let counters = match self.reconciler.vip_id(name) {
                Some(id) => self.dataplane.vip_counters(id)?,
                None => Default::default(),
            };
            let mut backends = Vec::new();
            for backend in &service.backends {
                let address = *backend.address.get_ref();
                let runtime = self.runtime.get(name, address).cloned().unwrap_or_default();
                let id = self.reconciler.backend_id(name, address);
                let counters = match id {
                    Some(id) => self.dataplane.backend_counters(id)?,
                    None => Default::default(),
                };
                let checked = service.health_check(backend).kind != HealthKind::None;
                let nat = self.nat_figures(name, id);
                backends.push(BackendStatus {
                    address,
                    origin: backend.origin,
                    backup: backend.backup,
                    weight: backend.weight.0,
                    effective_weight: ring_weights.get(&(name.as_str(), address)).copied().unwrap_or(0),
                    least_conn_active: id
                        .and_then(|id| least_conn.get(&id))
                        .map(|(counted, correction)| (*counted as i64 + correction).max(0) as u64),
                    health: if !checked {
                        Health::Unchecked
                    } else if runtime.health.up {
                        Health::Up
                    } else {
                        Health::Down
                    },
                    last_probe: runtime.health.last.as_ref().map(|p| ProbeStatus {
                        ok: p.ok,
                        detail: p.detail.clone(),
                        latency_ms: p.latency.as_secs_f64() * 1000.0,
                        age_ms: now.duration_since(p.at).unwrap_or_default().as_millis() as u64,
                    }),
                    admin: runtime.admin.view(),
                    in_ring: id.is_some() && ring_weights.get(&(name.as_str(), address)).copied().unwrap_or(0) > 0,
                    resolved: self.paths.contains_key(&address.ip),
                    active_flows: runtime.active_flows,
                    packets: counters.packets,
                    bytes: counters.bytes,
                    new_flows: counters.new_flows,
                    nat_flows: nat.map(|(used, _)| used),
                    nat_free_ports: nat.map(|(_, free)| free),
                });
            }
            let nat_port_exhausted = match self.reconciler.vip_id(name) {
                Some(id) if service.forwarding == crate::config::Forwarding::Nat => {
                    Some(self.dataplane.nat_exhausted(id)?)
                }
                _ => None,
            };
            services.push(ServiceStatus {
                name: name.clone(),
                vip: *service.vip.get_ref(),
                protocol: service.protocol,
                forwarding: service.forwarding,
                scheduler: service.scheduler,
                persistence_timeout_s: service.persistence_timeout_s,
                fail_open: self.modes.get(name).is_some_and(|m| m.fail_open),
                backup_active: self.modes.get(name).is_some_and(|m| m.backup_active),
                pins_follow_ring: self.reconciler.syns_skip_conntrack(name),
                packets: counters.packets,
                bytes: counters.bytes,
                new_flows: counters.new_flows,
                nat_port_exhausted,
                backends,
            });
        }
        Ok(Status {
            interface: self.config.agent.interface.clone(),
            services,
            outstanding_map_write: self.outstanding_write.clone(),
            discovery: self.discovery_status(),
            pin_dir: Some(self.config.agent.pin_root()),
            announce: self.announcer.as_ref().map(|announcer| crate::control::AnnounceStatus {
                table: announcer.table(),
                node: self.node,
                vips: self.announcements.clone(),
                error: announcer.last_error(),
            }),
            sync: self.sync_status(),
        })
    }

    pub(super) fn scrape(&mut self) -> String {
        let status = match self.status() {
            Ok(status) => Some(status),
            Err(err) => {
                log::error!("metrics: reading the data plane: {err:#}");
                None
            }
        };
        let globals = self.dataplane.global_counters().unwrap_or_default();
        let reading = Reading { status, globals, ring_rebuilds: self.dataplane.ring_writes };
        self.metrics.render(reading).unwrap_or_else(|err| format!("# error: {err:#}\n"))
    }

    /// Per-service and per-backend counters, printed at exit.
    pub fn summary(&self) -> String {
        let mut out = String::from("xdplb counters:\n");
        for service in &self.desired {
            let Some(vip_id) = self.reconciler.vip_id(&service.name) else {
                continue;
            };
            if let Ok(c) = self.dataplane.vip_counters(vip_id) {
                out += &format!(
                    "  service {} {} {}: packets={} bytes={} new_flows={}\n",
                    service.name, service.protocol, service.vip, c.packets, c.bytes, c.new_flows
                );
            }
            for backend in &service.backends {
                let Some(id) = self.reconciler.backend_id(&service.name, backend.address) else {
                    continue;
                };
                if let Ok(c) = self.dataplane.backend_counters(id) {
                    out += &format!(
                        "    backend {}: packets={} bytes={} new_flows={}\n",
                        backend.address, c.packets, c.bytes, c.new_flows
                    );
                }
            }
        }
        if let Ok(globals) = self.dataplane.global_counters() {
            let line: Vec<String> = globals.iter().map(|(c, v)| format!("{}={v}", c.name())).collect();
            out += &format!("  global: {}\n", line.join(" "));
        }
        out
    }
}
