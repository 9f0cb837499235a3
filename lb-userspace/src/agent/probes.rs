//! Health checkers: started, replaced and stopped with the configuration;
//! their reports move backends up and down.

use std::{collections::HashMap, net::IpAddr};

use super::*;

impl Agent {
    pub(super) fn on_probe(&mut self, report: ProbeReport) {
        let key = (report.service.clone(), report.address);
        let Some(checker) = self.checkers.get(&key) else {
            return;
        };
        if checker.generation != report.generation {
            return; // from a checker that has been replaced
        }
        let (rise, fall) = (checker.check.rise, checker.check.fall);
        let Some(state) = self.runtime.get_mut(&report.service, report.address) else {
            return;
        };
        let latency = report.outcome.latency;
        let detail = report.outcome.detail.clone();
        let labels = Metrics::labels(&report.service, report.address);
        if report.outcome.local {
            self.metrics.probe_local_errors.get_or_create(&labels).inc();
            // Logged when they start, not at every probe of a storm.
            if !state.local_errors {
                log::error!(
                    "service {}: probes of backend {} fail on this host ({detail}); \
                     not counted against the backend",
                    report.service,
                    report.address
                );
            }
            state.local_errors = true;
            return;
        }
        state.local_errors = false;
        self.metrics.probe_latency.get_or_create(&labels).observe(latency.as_secs_f64());
        if report.outcome.ok {
            state.latency.observe(latency.as_secs_f64() * 1000.0);
        }
        if let Some(up) = state.health.record(report.outcome, rise, fall) {
            self.metrics.transitions.get_or_create(&labels).inc();
            let (word, streak) = if up { ("UP", rise) } else { ("DOWN", fall) };
            log::warn!(
                "service {}: backend {} is {word} after {streak} consecutive probe(s): {detail} ({latency:.1?})",
                report.service,
                report.address
            );
            self.reconcile_logged();
        }
    }

    /// Starts, replaces or stops health checkers to match the configuration.
    pub(super) fn sync_checkers(&mut self) {
        let mut wanted = HashMap::new();
        for service in &self.config.services {
            for backend in &service.backends {
                let check = service.health_check(backend);
                if check.kind != HealthKind::None {
                    wanted.insert((service.name.get_ref().clone(), *backend.address.get_ref()), check);
                }
            }
        }
        self.checkers.retain(|key, checker| {
            let keep = wanted.get(key) == Some(&checker.check);
            if !keep {
                checker.task.abort();
            }
            keep
        });
        for (key, check) in wanted {
            if self.checkers.contains_key(&key) {
                continue;
            }
            self.next_generation += 1;
            let generation = self.next_generation;
            let tunnel_slot = TunnelSlot::default();
            let task = tokio::spawn(health::run_checker(
                key.0.clone(),
                key.1,
                check.clone(),
                tunnel_slot.clone(),
                generation,
                self.probe_tx.clone(),
            ));
            self.checkers.insert(key, Checker { check, generation, task, tunnel_slot });
        }
        self.update_tunnel_slots();
    }

    /// Tells the probes through tunnels which backend slot to encapsulate
    /// to (slots change as backends come and go).
    pub(super) fn update_tunnel_slots(&self) {
        for ((service, address), checker) in &self.checkers {
            if checker.check.through_tunnel.is_some() {
                let slot = self.reconciler.backend_id(service, *address).unwrap_or(0);
                checker.tunnel_slot.store(slot, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Puts the probe-tunnelling tc program on every interface a probe
    /// through a tunnel leaves by: the kernel's route to each such VIP.
    pub(super) async fn attach_probe_tunnels(&mut self) {
        let vips: std::collections::BTreeSet<IpAddr> =
            self.checkers.values().filter_map(|c| c.check.through_tunnel).collect();
        for vip in vips {
            let result = async {
                let ifindex = self.netlink.route_interface(vip).await?;
                self.dataplane.attach_probe_tunnel(ifindex)
            }
            .await;
            if let Err(err) = result {
                log::warn!("probes of VIP {vip} through tunnels: {err:#}");
            }
        }
    }
}
