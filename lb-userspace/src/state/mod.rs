//! The agent's desired state: the configuration (file, changed by CLI
//! commands) plus what the agent learns at run time (health, admin state,
//! active flows). `desired_services` turns it into what the reconciler
//! writes. Pure: no I/O, time passed in.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use crate::{
    config::{AgentConfig, BackendAddress, Config, Forwarding, HealthKind, OnFailure, PortRange, Protocol, Scheduler},
    control::Admin,
    health::HealthState,
    netlink::L2Path,
    scheduling::{Ewma, response_time_weights},
};

/// Operator's wish for a backend, independent of its health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminState {
    Enabled,
    /// No new flows; established flows continue until they end.
    Draining {
        since: Instant,
    },
    /// Draining finished: no active flows left, or the drain timeout passed.
    Drained,
}

impl AdminState {
    pub fn view(&self) -> Admin {
        match self {
            AdminState::Enabled => Admin::Enabled,
            AdminState::Draining { .. } => Admin::Draining,
            AdminState::Drained => Admin::Drained,
        }
    }

    pub fn name(&self) -> &'static str {
        self.view().name()
    }
}

#[derive(Clone, Debug)]
pub struct BackendRuntime {
    pub health: HealthState,
    pub admin: AdminState,
    /// Connection-table entries of this backend seen within the idle timeout
    /// and not finished, at the last scan.
    pub active_flows: u64,
    /// Mean response time of successful probes (least_response_time).
    pub latency: Ewma,
    /// The weight least_response_time derived last; 0 until it has.
    pub derived_weight: u32,
    /// The last probe failed for a reason on the LB itself.
    pub local_errors: bool,
}

impl Default for BackendRuntime {
    fn default() -> Self {
        Self {
            health: HealthState::default(),
            admin: AdminState::Enabled,
            active_flows: 0,
            latency: Ewma::default(),
            derived_weight: 0,
            local_errors: false,
        }
    }
}

/// Run-time facts per (service, backend address).
#[derive(Debug, Default)]
pub struct Runtime {
    pub backends: BTreeMap<(String, BackendAddress), BackendRuntime>,
    /// The kernel's ephemeral ports (`ip_local_port_range`): the LB's own
    /// connections, health checks among them, take their source ports there,
    /// so NAT pools leave them out.
    pub local_ports: Option<PortRange>,
}

impl Runtime {
    /// Drops the state of backends no longer configured and creates it for
    /// new ones; kept backends keep their health and admin state.
    pub fn sync_with(&mut self, config: &Config) {
        let mut wanted = BTreeMap::new();
        for service in &config.services {
            for backend in &service.backends {
                let key = (service.name.get_ref().clone(), *backend.address.get_ref());
                let state = self.backends.remove(&key).unwrap_or_default();
                wanted.insert(key, state);
            }
        }
        self.backends = wanted;
    }

    pub fn get(&self, service: &str, address: BackendAddress) -> Option<&BackendRuntime> {
        self.backends.get(&(service.to_string(), address))
    }

    pub fn get_mut(&mut self, service: &str, address: BackendAddress) -> Option<&mut BackendRuntime> {
        self.backends.get_mut(&(service.to_string(), address))
    }

    /// least_response_time: derives each backend's weight from its mean
    /// response time (see `scheduling::response_time_weights`). Returns
    /// whether any weight changed.
    pub fn rebalance_response_time(&mut self, config: &Config) -> bool {
        let mut changed = false;
        for service in config.services.iter().filter(|s| s.scheduler == Scheduler::LeastResponseTime) {
            let name = service.name.get_ref();
            let keys: Vec<(String, BackendAddress)> =
                service.backends.iter().map(|b| (name.clone(), *b.address.get_ref())).collect();
            let configured: Vec<u32> = service.backends.iter().map(|b| b.weight.0).collect();
            let state = |k: &(String, BackendAddress)| self.backends.get(k).cloned().unwrap_or_default();
            let means: Vec<Option<f64>> = keys.iter().map(|k| state(k).latency.mean).collect();
            let previous: Vec<u32> = keys.iter().map(|k| state(k).derived_weight).collect();
            let next = response_time_weights(&configured, &means, &previous);
            for (key, weight) in keys.iter().zip(next) {
                if let Some(b) = self.backends.get_mut(key)
                    && b.derived_weight != weight
                {
                    b.derived_weight = weight;
                    changed = true;
                }
            }
        }
        changed
    }

    /// Moves draining backends to drained once they have no active flow or
    /// their drain timeout has passed. Returns those that finished.
    pub fn advance_drains(&mut self, config: &Config, now: Instant) -> Vec<(String, BackendAddress, &'static str)> {
        let timeouts: HashMap<&str, Duration> = config
            .services
            .iter()
            .map(|s| (s.name.get_ref().as_str(), Duration::from_secs(s.drain_timeout_s)))
            .collect();
        let mut finished = Vec::new();
        for ((service, address), state) in &mut self.backends {
            let AdminState::Draining { since } = state.admin else {
                continue;
            };
            let timeout = timeouts.get(service.as_str()).copied().unwrap_or_default();
            let why = if state.active_flows == 0 {
                "no active flows left"
            } else if now.duration_since(since) >= timeout {
                "drain timeout passed"
            } else {
                continue;
            };
            state.admin = AdminState::Drained;
            finished.push((service.clone(), *address, why));
        }
        finished
    }
}

/// How a service picks the backends that take new flows, as a whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceMode {
    /// Every backend is down: all enabled ones stay in the ring.
    pub fail_open: bool,
    /// No primary backend is available: the backups take new flows.
    pub backup_active: bool,
}

pub type ServiceModes = BTreeMap<String, ServiceMode>;

/// The data plane's desired state.
///
/// A backend takes new flows when it is enabled, healthy and weighted.
/// Backup backends take them only while no primary backend does; flows
/// already on a backup stay there when a primary returns. When no backend
/// of a service is healthy, the service fails open: its enabled backends
/// stay in the ring as if healthy, since dropping every new flow is worse
/// than trying. A backend that is down has its flows rescheduled by the
/// data plane, unless the service says `on_failure = "keep"` or fails open.
pub fn desired_services(
    config: &Config,
    runtime: &Runtime,
    paths: &HashMap<IpAddr, L2Path>,
) -> (Vec<DesiredService>, ServiceModes) {
    let mut services = Vec::with_capacity(config.services.len());
    let mut modes = ServiceModes::new();
    for service in &config.services {
        let name = service.name.get_ref();
        let state_of = |address: BackendAddress| runtime.get(name, address).cloned().unwrap_or_default();
        let enabled = |address: BackendAddress| state_of(address).admin == AdminState::Enabled;
        let checked = |b: &crate::config::BackendConfig| service.health_check(b).kind != HealthKind::None;
        let up = |b: &crate::config::BackendConfig| !checked(b) || state_of(*b.address.get_ref()).health.up;
        let candidates: Vec<_> =
            service.backends.iter().filter(|b| b.weight.0 > 0 && enabled(*b.address.get_ref())).collect();
        let primary_up = candidates.iter().any(|b| !b.backup && up(b));
        let backup_up = candidates.iter().any(|b| b.backup && up(b));
        let mode = ServiceMode {
            fail_open: !candidates.is_empty() && !primary_up && !backup_up,
            backup_active: !primary_up && backup_up,
        };
        modes.insert(name.clone(), mode);

        let mut healthy_in_ring = 0;
        let backends = service
            .backends
            .iter()
            .map(|b| {
                let address = *b.address.get_ref();
                let up = up(b);
                let in_active_set = b.backup == mode.backup_active;
                let takes_new_flows = enabled(address) && ((up && in_active_set) || mode.fail_open);
                let path = paths.get(&address.ip).and_then(|p| path_for(service, &config.agent, address.ip, p));
                if takes_new_flows && up && !mode.fail_open && path.is_some() {
                    healthy_in_ring += 1;
                }
                let derived = state_of(address).derived_weight;
                let weight = match service.scheduler {
                    Scheduler::LeastResponseTime if derived > 0 && b.weight.0 > 0 => derived,
                    _ => b.weight.0,
                };
                DesiredBackend {
                    address,
                    weight: if takes_new_flows { weight } else { 0 },
                    path,
                    down: !up && !mode.fail_open && service.on_failure == OnFailure::Reschedule,
                }
            })
            .collect();
        services.push(DesiredService {
            name: name.clone(),
            vip: *service.vip.get_ref(),
            protocol: service.protocol,
            scheduler: service.scheduler,
            persistence_timeout_s: service.persistence_timeout_s,
            forwarding: service.forwarding,
            gue_port: *service.gue_port.get_ref(),
            nat: (service.forwarding == Forwarding::Nat).then(|| DesiredNat {
                sources: service.nat_sources().to_vec(),
                ports: service.nat_ports(),
                preserve_client: service.preserves_client(),
                exclude: runtime.local_ports,
            }),
            backends,
            healthy_in_ring,
            announce_min_healthy: service.announce_min_healthy,
        });
    }
    (services, modes)
}

/// A backend's path as its forwarding mode uses it: a tunnel needs an
/// outer source address, `[agent] tunnel_source_v4/v6` when set; full NAT
/// without `nat_source` needs the route's source address.
fn path_for(
    service: &crate::config::ServiceConfig,
    agent: &AgentConfig,
    backend: IpAddr,
    path: &L2Path,
) -> Option<L2Path> {
    if service.forwarding == Forwarding::Nat {
        let own_source = !service.preserves_client() && service.nat_sources().is_empty();
        return (!own_source || path.source.is_some_and(|s| s.is_ipv4() == backend.is_ipv4())).then_some(*path);
    }
    if !service.forwarding.is_tunnel() {
        return Some(*path);
    }
    let configured = match backend {
        IpAddr::V4(_) => agent.tunnel_source_v4.as_ref().map(|a| IpAddr::V4(*a.get_ref())),
        IpAddr::V6(_) => agent.tunnel_source_v6.as_ref().map(|a| IpAddr::V6(*a.get_ref())),
    };
    let source = configured.or(path.source).filter(|s| s.is_ipv4() == backend.is_ipv4())?;
    Some(L2Path { source: Some(source), ..*path })
}

/// A service as the data plane should serve it now: what the planner reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    pub persistence_timeout_s: u32,
    pub forwarding: Forwarding,
    /// GUE: the backends' decapsulation port.
    pub gue_port: u16,
    /// NAT services: how they translate.
    pub nat: Option<DesiredNat>,
    pub backends: Vec<DesiredBackend>,
    /// Backends in the ring that pass their checks (none while failing open).
    pub healthy_in_ring: u32,
    /// Route health injection: announce the VIP from this many healthy ones.
    pub announce_min_healthy: u32,
}

impl DesiredService {
    /// A maglev DSR service without affinity, announced from one backend
    /// (what tests and tools build on).
    pub fn dsr(name: &str, vip: SocketAddr, protocol: Protocol, backends: Vec<DesiredBackend>) -> Self {
        let healthy_in_ring = backends.iter().filter(|b| b.weight > 0 && b.path.is_some()).count() as u32;
        DesiredService {
            name: name.into(),
            vip,
            protocol,
            scheduler: Scheduler::Maglev,
            persistence_timeout_s: 0,
            forwarding: Forwarding::Dsr,
            gue_port: lb_common::DEFAULT_GUE_PORT,
            nat: None,
            backends,
            healthy_in_ring,
            announce_min_healthy: 1,
        }
    }
}

/// A NAT service's translation settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredNat {
    /// Source addresses; empty: each backend's route source.
    pub sources: Vec<IpAddr>,
    pub ports: PortRange,
    pub preserve_client: bool,
    /// Ports left out of the pool (the kernel's ephemeral range).
    pub exclude: Option<PortRange>,
}

impl DesiredNat {
    /// (ports in the pool, first skipped port, ports skipped).
    pub fn pool(&self) -> (u32, u16, u16) {
        lb_common::nat::pool_without(self.ports.low, self.ports.high, self.exclude.map(|r| (r.low, r.high)))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub address: BackendAddress,
    pub weight: u32,
    /// `None` until the neighbour is resolved; such a backend gets no slot.
    pub path: Option<L2Path>,
    /// Failed health checks: the data plane reschedules its pinned flows.
    pub down: bool,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::health::ProbeOutcome;

    fn config(extra_service_keys: &str) -> Config {
        let text = format!(
            "[agent]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"198.18.0.100:80\"\nprotocol = \"tcp\"\n{extra_service_keys}\n\
             [[service.backend]]\naddress = \"198.18.1.11\"\n\n[[service.backend]]\naddress = \"198.18.1.12\"\nweight = 3\n"
        );
        Config::parse(&text, Path::new("t.toml")).unwrap()
    }

    fn addr(n: u8) -> BackendAddress {
        BackendAddress::new(IpAddr::from([198, 18, 1, n]))
    }

    fn paths() -> HashMap<IpAddr, L2Path> {
        [11, 12]
            .map(|n| (addr(n).ip, L2Path { ifindex: 2, src_mac: [0; 6], dst_mac: [n; 6], mtu: 1500, source: None }))
            .into_iter()
            .collect()
    }

    fn set_health(runtime: &mut Runtime, n: u8, up: bool) {
        let state = runtime.get_mut("web", addr(n)).unwrap();
        let outcome = ProbeOutcome {
            ok: up,
            latency: Duration::ZERO,
            detail: String::new(),
            at: std::time::SystemTime::now(),
            local: false,
        };
        while state.health.up != up {
            state.health.record(outcome.clone(), 1, 1);
        }
    }

    fn weights_and_down(services: &[DesiredService]) -> Vec<(u32, bool)> {
        services[0].backends.iter().map(|b| (b.weight, b.down)).collect()
    }

    #[test]
    fn healthy_enabled_backends_keep_their_weights() {
        let c = config("");
        let mut r = Runtime::default();
        r.sync_with(&c);
        let (services, modes) = desired_services(&c, &r, &paths());
        assert_eq!(weights_and_down(&services), [(1, false), (3, false)]);
        assert_eq!(services[0].backends[1].path.unwrap().dst_mac, [12; 6]);
        assert_eq!(modes["web"], ServiceMode::default());
    }

    #[test]
    fn a_down_backend_leaves_the_ring_and_its_flows_are_rescheduled() {
        let c = config("");
        let mut r = Runtime::default();
        r.sync_with(&c);
        set_health(&mut r, 11, false);
        let (services, _) = desired_services(&c, &r, &paths());
        assert_eq!(weights_and_down(&services), [(0, true), (3, false)]);
        // on_failure = "keep": out of the ring, but flows stay.
        let c = config("on_failure = \"keep\"");
        let (services, _) = desired_services(&c, &r, &paths());
        assert_eq!(weights_and_down(&services), [(0, false), (3, false)]);
    }

    #[test]
    fn all_down_fails_open() {
        let c = config("");
        let mut r = Runtime::default();
        r.sync_with(&c);
        set_health(&mut r, 11, false);
        set_health(&mut r, 12, false);
        let (services, modes) = desired_services(&c, &r, &paths());
        assert_eq!(weights_and_down(&services), [(1, false), (3, false)]);
        assert!(modes["web"].fail_open);
    }

    #[test]
    fn draining_takes_no_new_flows_but_keeps_flows_and_completes() {
        let c = config("drain_timeout_s = 60");
        let mut r = Runtime::default();
        r.sync_with(&c);
        let start = Instant::now();
        let state = r.get_mut("web", addr(12)).unwrap();
        state.admin = AdminState::Draining { since: start };
        state.active_flows = 2;
        let (services, _) = desired_services(&c, &r, &paths());
        assert_eq!(weights_and_down(&services), [(1, false), (0, false)]);

        // Flows still active: still draining.
        assert!(r.advance_drains(&c, start + Duration::from_secs(1)).is_empty());
        // Flows gone: drained.
        r.get_mut("web", addr(12)).unwrap().active_flows = 0;
        assert_eq!(
            r.advance_drains(&c, start + Duration::from_secs(2)),
            [("web".to_string(), addr(12), "no active flows left")]
        );
        assert_eq!(r.get("web", addr(12)).unwrap().admin, AdminState::Drained);
        // Or the timeout passes.
        let state = r.get_mut("web", addr(11)).unwrap();
        state.admin = AdminState::Draining { since: start };
        state.active_flows = 5;
        assert_eq!(r.advance_drains(&c, start + Duration::from_secs(60))[0].2, "drain timeout passed");
    }

    #[test]
    fn draining_every_backend_is_not_failing_open() {
        let c = config("");
        let mut r = Runtime::default();
        r.sync_with(&c);
        for n in [11, 12] {
            r.get_mut("web", addr(n)).unwrap().admin = AdminState::Drained;
        }
        let (services, modes) = desired_services(&c, &r, &paths());
        assert_eq!(weights_and_down(&services), [(0, false), (0, false)]);
        assert!(!modes["web"].fail_open);
    }

    #[test]
    fn unchecked_backends_are_never_down() {
        let c = config("[service.health]\nkind = \"none\"");
        let mut r = Runtime::default();
        r.sync_with(&c);
        set_health(&mut r, 11, false);
        let (services, _) = desired_services(&c, &r, &paths());
        assert_eq!(weights_and_down(&services), [(1, false), (3, false)]);
    }

    #[test]
    fn least_response_time_weights_follow_latency() {
        let c = config("scheduler = \"least_response_time\"");
        let mut r = Runtime::default();
        r.sync_with(&c);
        // Before any measurement: the configured 1:3.
        assert!(r.rebalance_response_time(&c));
        let (services, _) = desired_services(&c, &r, &paths());
        assert_eq!(services[0].backends[1].weight, 3 * services[0].backends[0].weight);
        // Backend 12 answers in 60 ms, backend 11 in 2 ms.
        for _ in 0..20 {
            r.get_mut("web", addr(11)).unwrap().latency.observe(2.0);
            r.get_mut("web", addr(12)).unwrap().latency.observe(60.0);
        }
        for _ in 0..10 {
            r.rebalance_response_time(&c);
        }
        let (services, _) = desired_services(&c, &r, &paths());
        let (w11, w12) = (services[0].backends[0].weight, services[0].backends[1].weight);
        // 3× the weight but 30× slower: a tenth of the fast one's share.
        assert!(w12 * 5 < w11, "w11 {w11}, w12 {w12}");
        // Settled: another round changes nothing.
        assert!(!r.rebalance_response_time(&c));
    }

    #[test]
    fn tunnel_backends_need_a_source_of_their_family_and_take_the_configured_one() {
        let c = config("forwarding = \"ipip\"");
        let mut r = Runtime::default();
        r.sync_with(&c);
        // No source known: no slot (like an unresolved neighbour).
        let (services, _) = desired_services(&c, &r, &paths());
        assert!(services[0].backends.iter().all(|b| b.path.is_none()));
        // The route's source.
        let with_source: HashMap<IpAddr, L2Path> = paths()
            .into_iter()
            .map(|(a, p)| (a, L2Path { source: Some("198.18.2.3".parse().unwrap()), ..p }))
            .collect();
        let (services, _) = desired_services(&c, &r, &with_source);
        assert_eq!(services[0].backends[0].path.unwrap().source, Some("198.18.2.3".parse().unwrap()));
        assert_eq!(services[0].forwarding, Forwarding::Ipip);
        // [agent] tunnel_source_v4 wins; tunnel_source_v6 is not for IPv4 backends.
        let mut c = c.clone();
        c.agent.tunnel_source_v6 = Some(toml::Spanned::new(0..0, "2001:db8::3".parse().unwrap()));
        let (services, _) = desired_services(&c, &r, &with_source);
        assert_eq!(services[0].backends[0].path.unwrap().source, Some("198.18.2.3".parse().unwrap()));
        c.agent.tunnel_source_v4 = Some(toml::Spanned::new(0..0, "198.18.2.99".parse().unwrap()));
        let (services, _) = desired_services(&c, &r, &paths());
        assert_eq!(services[0].backends[1].path.unwrap().source, Some("198.18.2.99".parse().unwrap()));
        // DSR backends need no source.
        let dsr = config("");
        assert!(desired_services(&dsr, &r, &paths()).0[0].backends.iter().all(|b| b.path.is_some()));
    }

    /// Backends 11 and 12 primary, 13 a backup.
    fn with_backup() -> (Config, HashMap<IpAddr, L2Path>) {
        let mut c = config("");
        let mut backup = c.services[0].backends[0].clone();
        backup.address = toml::Spanned::new(0..0, addr(13));
        backup.backup = true;
        c.services[0].backends.push(backup);
        let mut paths = paths();
        paths.insert(addr(13).ip, L2Path { dst_mac: [13; 6], ..paths[&addr(11).ip] });
        (c, paths)
    }

    #[test]
    fn backups_take_new_flows_only_while_no_primary_is_available() {
        let (c, paths) = with_backup();
        let mut r = Runtime::default();
        r.sync_with(&c);
        // Primaries healthy: the backup is out of the ring, not down.
        let (services, modes) = desired_services(&c, &r, &paths);
        assert_eq!(weights_and_down(&services), [(1, false), (3, false), (0, false)]);
        assert_eq!(modes["web"], ServiceMode::default());
        // One primary down: still the primaries.
        set_health(&mut r, 11, false);
        let (services, _) = desired_services(&c, &r, &paths);
        assert_eq!(weights_and_down(&services), [(0, true), (3, false), (0, false)]);
        // Both down: the backup alone; the primaries' flows are rescheduled.
        set_health(&mut r, 12, false);
        let (services, modes) = desired_services(&c, &r, &paths);
        assert_eq!(weights_and_down(&services), [(0, true), (0, true), (1, false)]);
        assert_eq!(modes["web"], ServiceMode { fail_open: false, backup_active: true });
        // A primary returns: new flows leave the backup, whose flows stay (not down).
        set_health(&mut r, 12, true);
        let (services, modes) = desired_services(&c, &r, &paths);
        assert_eq!(weights_and_down(&services), [(0, true), (3, false), (0, false)]);
        assert!(!modes["web"].backup_active);
        // Primaries drained count as unavailable too.
        set_health(&mut r, 11, true);
        for n in [11, 12] {
            r.get_mut("web", addr(n)).unwrap().admin = AdminState::Drained;
        }
        let (services, modes) = desired_services(&c, &r, &paths);
        assert_eq!(weights_and_down(&services), [(0, false), (0, false), (1, false)]);
        assert!(modes["web"].backup_active);
    }

    #[test]
    fn every_backend_down_with_backups_fails_open_over_all() {
        let (c, paths) = with_backup();
        let mut r = Runtime::default();
        r.sync_with(&c);
        for n in [11, 12, 13] {
            set_health(&mut r, n, false);
        }
        let (services, modes) = desired_services(&c, &r, &paths);
        assert_eq!(weights_and_down(&services), [(1, false), (3, false), (1, false)]);
        assert_eq!(modes["web"], ServiceMode { fail_open: true, backup_active: false });
        // The backup alone up: it serves.
        set_health(&mut r, 13, true);
        let (services, modes) = desired_services(&c, &r, &paths);
        assert_eq!(weights_and_down(&services), [(0, true), (0, true), (1, false)]);
        assert!(modes["web"].backup_active && !modes["web"].fail_open);
    }

    #[test]
    fn sync_keeps_state_of_remaining_backends_only() {
        let c = config("");
        let mut r = Runtime::default();
        r.sync_with(&c);
        r.get_mut("web", addr(11)).unwrap().admin = AdminState::Drained;
        let mut smaller = c.clone();
        smaller.services[0].backends.remove(1);
        r.sync_with(&smaller);
        assert_eq!(r.backends.len(), 1);
        assert_eq!(r.get("web", addr(11)).unwrap().admin, AdminState::Drained);
    }
}
