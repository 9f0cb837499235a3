//! Connection-table sync: the agent's side. Flows this node pins go out to
//! the peers with their backends' addresses; the peers' flows come in and
//! become map writes (through the one writer) for the backends this node
//! has at the same addresses.

use std::net::SocketAddr;

use lb_common::{FlowEvent, FlowKey, FlowState, GlobalCounter};

use super::*;
use crate::{
    config::Forwarding,
    dataplane::planner::{address_words, family, words_address},
    sync::message::SyncedFlow,
};

impl Agent {
    /// Flows the data plane pinned: to the peers. NAT flows stay local
    /// (their translation lives on this node, and so do their replies).
    pub(super) fn on_flow_events(&mut self, events: Vec<FlowEvent>) {
        let Some(sync) = self.sync.as_mut() else {
            return;
        };
        let backends = self.reconciler.backends_by_id();
        let forwarding: HashMap<&str, Forwarding> =
            self.config.services.iter().map(|s| (s.name.get_ref().as_str(), s.forwarding)).collect();
        let flows: Vec<SyncedFlow> = events
            .iter()
            .filter_map(|event| {
                let (service, backend) = backends.get(&event.backend_id)?;
                if forwarding.get(service) == Some(&Forwarding::Nat) {
                    return None;
                }
                let key = &event.flow;
                Some(SyncedFlow {
                    protocol: key.proto,
                    client: SocketAddr::new(words_address(key.src, key.family), u16::from_be(key.sport)),
                    vip: SocketAddr::new(words_address(key.dst, key.family), u16::from_be(key.dport)),
                    backend: backend.ip,
                })
            })
            .collect();
        if !flows.is_empty() {
            sync.send(&flows);
        }
    }

    /// A peer's flows: each one this node can place (the VIP's service and
    /// a backend at that address) is adopted unless this node pinned the
    /// flow itself.
    pub(super) fn on_synced_flows(&mut self, flows: Vec<SyncedFlow>) {
        let now = monotonic_ns();
        let mut writes = Vec::with_capacity(flows.len());
        let mut pins = Vec::with_capacity(flows.len());
        let mut unknown = 0;
        for flow in &flows {
            match self.local_backend(flow) {
                Some(backend_id) => {
                    let key = FlowKey {
                        src: address_words(flow.client.ip()),
                        dst: address_words(flow.vip.ip()),
                        sport: flow.client.port().to_be(),
                        dport: flow.vip.port().to_be(),
                        proto: flow.protocol,
                        family: family(flow.vip.ip()),
                        _pad: [0; 2],
                    };
                    pins.push((key, backend_id));
                    writes
                        .push(MapWrite::AdoptFlow { key, state: FlowState { backend_id, flags: 0, last_seen_ns: now } })
                }
                None => unknown += 1,
            }
        }
        if self.reconciler.admit_pins(&pins) {
            // A peer's flow strays from this node's ring: the service's
            // SYNs look at the connection table again before it is pinned.
            self.reconcile_logged();
        }
        let adopted = writes.len() as u64;
        let applied = self.apply_writes(&writes);
        if let Some(sync) = self.sync.as_mut() {
            sync.unknown_flows += unknown;
            if applied.is_ok() {
                sync.adopted_flows += adopted;
            }
        }
        if let Err(err) = applied {
            log::error!("[sync] adopting the peers' flows: {err:#}");
        }
    }

    /// This node's slot for `flow`'s backend: the service of its VIP (the
    /// exact port first, then a port-0 service) and its backend at that address.
    fn local_backend(&self, flow: &SyncedFlow) -> Option<u32> {
        if flow.client.is_ipv4() != flow.vip.is_ipv4() {
            return None;
        }
        let protocol = |s: &&crate::config::ServiceConfig| s.protocol.number() == flow.protocol;
        let service = lb_common::exact_port_or_wildcard(flow.vip.port(), |port| {
            let wanted = SocketAddr::new(flow.vip.ip(), port);
            self.config.services.iter().filter(protocol).find(|s| *s.vip.get_ref() == wanted)
        })
        .filter(|s| s.forwarding != Forwarding::Nat)?;
        let backend = service.backends.iter().find(|b| b.address.get_ref().ip == flow.backend)?;
        self.reconciler.backend_id(service.name.get_ref(), *backend.address.get_ref())
    }

    pub(super) fn sync_status(&self) -> Option<crate::sync::SyncStatus> {
        let sync = self.sync.as_ref()?;
        let lost =
            self.dataplane.global_counters().ok().and_then(|globals| {
                globals.into_iter().find(|(c, _)| *c == GlobalCounter::SyncEventLost).map(|(_, v)| v)
            });
        Some(sync.status(lost.unwrap_or(0)))
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the data plane's
/// `last_seen_ns` (bpf_ktime_get_coarse_ns).
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * lb_common::NS_PER_SEC + t.tv_nsec() as u64)
        .unwrap_or(0)
}
