//! NAT upkeep in the agent: the program on the interfaces backends' replies
//! arrive on, the NAT tables' expiry (which frees source ports), the per-
//! backend figures `status` shows, and a bounded-rate log of exhausted pools.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use super::*;
use crate::dataplane::planner::nat::{NatTimeouts, NatUpkeep};

/// An exhausted pool is logged at most this often per service.
const EXHAUSTED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the last NAT scan found, and what was logged.
#[derive(Debug, Default)]
pub(super) struct NatState {
    /// Live translations per backend id (source ports in use).
    pub translations: HashMap<u32, u64>,
    /// Unfinished NAT flows per backend id.
    pub active: HashMap<u32, u64>,
    /// Per service: refused flows at the last log, and when it was.
    exhausted_logged: HashMap<String, (u64, Instant)>,
    /// Interfaces whose missing IP forwarding was reported.
    forwarding_warned: BTreeSet<u32>,
}

impl Agent {
    /// Interfaces that NAT backends are reached by, besides the main one:
    /// their replies arrive there, so the program runs there too, for as
    /// long as a NAT slot has flows (a service that stopped using NAT keeps
    /// its connections' replies translated until they end). Called after
    /// every reconcile and every scan that frees slots.
    pub(super) fn sync_reply_interfaces(&mut self) {
        if !self.dataplane.is_attached() {
            return;
        }
        let mut reply_interfaces = self.reconciler.nat_interfaces();
        let wanted: BTreeSet<u32> =
            reply_interfaces.iter().copied().filter(|ifindex| *ifindex != self.main_ifindex).collect();
        match self.dataplane.sync_reply_interfaces(&wanted, self.xdp_mode()) {
            Ok(changes) => changes.iter().for_each(|c| log::info!("{c}")),
            Err(err) => log::error!("NAT replies: {err:#}"),
        }
        if !reply_interfaces.is_empty() {
            reply_interfaces.insert(self.main_ifindex);
        }
        self.warn_without_forwarding(&reply_interfaces);
    }

    /// The kernel's FIB lookup, which finds a reply's way to the client,
    /// answers only on interfaces that forward.
    fn warn_without_forwarding(&mut self, interfaces: &BTreeSet<u32>) {
        for &ifindex in interfaces {
            let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
                continue;
            };
            let name = name.to_string_lossy();
            let off = ["ipv4", "ipv6"].into_iter().filter(|family| {
                let path = format!("/proc/sys/net/{family}/conf/{name}/forwarding");
                std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0")
            });
            let off: Vec<&str> = off.collect();
            if !off.is_empty() && self.nat.forwarding_warned.insert(ifindex) {
                log::error!(
                    "NAT replies arrive on {name}, where IP forwarding is off ({}): the kernel's route lookup \
                     for them fails and they go to the kernel instead. Set net.ipv4.conf.{name}.forwarding=1 \
                     and net.ipv6.conf.{name}.forwarding=1",
                    off.join(", ")
                );
            } else if off.is_empty() {
                self.nat.forwarding_warned.remove(&ifindex);
            }
        }
    }

    /// How long NAT translations outlive their traffic.
    pub(super) fn nat_timeouts(&self) -> NatTimeouts {
        let agent = &self.config.agent;
        NatTimeouts {
            tcp_idle_ns: agent.tcp_idle_ns(),
            udp_idle_ns: agent.udp_idle_ns(),
            fin_linger_ns: agent.nat_fin_linger_s.saturating_mul(lb_common::NS_PER_SEC),
        }
    }

    /// A NAT scan's result: ended flows expire (through the one writer),
    /// and its figures are kept for `status`.
    pub(super) fn on_nat_scan(&mut self, upkeep: NatUpkeep) {
        self.nat.translations = upkeep.translations;
        self.nat.active = upkeep.active;
        if !upkeep.writes.is_empty() {
            log::debug!("NAT: {} translation entries of ended flows removed", upkeep.writes.len());
        }
        if let Err(err) = self.apply_writes(&upkeep.writes) {
            log::error!("NAT upkeep: {err:#}");
        }
    }

    pub(super) fn log_exhausted_pools(&mut self) {
        let now = Instant::now();
        for service in self.desired.iter().filter(|s| s.nat.is_some()) {
            let Some(refused) =
                self.reconciler.vip_id(&service.name).and_then(|id| self.dataplane.nat_exhausted(id).ok())
            else {
                continue;
            };
            let (logged, at) =
                self.nat.exhausted_logged.get(&service.name).copied().unwrap_or((0, now - EXHAUSTED_LOG_INTERVAL));
            if refused > logged && now.duration_since(at) >= EXHAUSTED_LOG_INTERVAL {
                let ports = service.nat.as_ref().map(|n| n.ports.to_string()).unwrap_or_default();
                log::warn!(
                    "service {}: {} new flow(s) refused since the last report: no free NAT source port \
                     (nat_source_ports = \"{ports}\"; add nat_source addresses or widen the range)",
                    service.name,
                    refused - logged
                );
                self.nat.exhausted_logged.insert(service.name.clone(), (refused, now));
            }
        }
    }

    /// A NAT backend's figures for `status`: (translations, free ports).
    pub(super) fn nat_figures(&self, service: &str, id: Option<u32>) -> Option<(u64, u64)> {
        let desired = self.desired.iter().find(|s| s.name == service)?;
        let nat = desired.nat.as_ref()?;
        let used = id.and_then(|id| self.nat.translations.get(&id)).copied().unwrap_or(0);
        // Each source address has the whole pool towards each backend.
        let pool = if nat.preserve_client { 0 } else { nat.pool().0 as u64 * nat.sources.len().max(1) as u64 };
        Some((used, pool.saturating_sub(used)))
    }
}
