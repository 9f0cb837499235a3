//! `xdplb run`: attach, keep the maps reconciled to the configuration, and
//! detach on SIGINT/SIGTERM. SIGHUP re-reads the configuration; an invalid
//! one is reported and the running state is kept.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{Config, XdpModeConfig},
    dataplane::{Dataplane, DataplaneParams},
    netlink::Netlink,
    reconcile::{DesiredBackend, DesiredService, Reconciler},
};

/// How long one neighbour resolution may wait for an answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often neighbours are re-resolved and retired backends collected.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(5);
/// How soon an unresolved backend is tried again.
const UNRESOLVED_RETRY: Duration = Duration::from_secs(1);

pub struct Agent {
    config_path: PathBuf,
    config: Config,
    netlink: Netlink,
    dataplane: Dataplane,
    reconciler: Reconciler,
    desired: Vec<DesiredService>,
    /// Some backend's neighbour is not resolved yet: retry soon.
    unresolved: bool,
}

impl Agent {
    /// Validates the config, loads and attaches the program, programs the maps.
    pub async fn start(config_path: PathBuf) -> Result<Self> {
        let config = Config::load(&config_path)?;
        let netlink = Netlink::connect()?;
        let agent_config = &config.agent;
        netlink.ifindex_by_name(&agent_config.interface).await?;
        let params = DataplaneParams {
            ring_size: *agent_config.ring_size.get_ref(),
            max_services: *agent_config.max_services.get_ref(),
            conntrack_size: agent_config.conntrack_size,
            udp_idle_timeout_ns: agent_config.udp_idle_timeout_s * 1_000_000_000,
        };
        let dataplane = Dataplane::load(params)?;
        let reconciler = Reconciler::new(params.ring_size, params.max_services);
        let mut agent = Self {
            config_path,
            config,
            netlink,
            dataplane,
            reconciler,
            desired: Vec::new(),
            unresolved: false,
        };
        // Program the maps before attaching, so the first packet already finds its VIP.
        agent.unresolved = !agent.refresh_desired().await;
        agent.reconcile()?;
        let mode = match agent.config.agent.xdp_mode {
            XdpModeConfig::Driver => XdpMode::Driver,
            XdpModeConfig::Skb => XdpMode::Skb,
        };
        agent
            .dataplane
            .attach(&agent.config.agent.interface, mode)?;
        log::info!(
            "attached to {} ({:?} mode) with {} service(s)",
            agent.config.agent.interface,
            mode,
            agent.config.services.len()
        );
        if !agent.unresolved {
            log::info!("all backends resolved");
        }
        Ok(agent)
    }

    pub async fn run(mut self) -> Result<()> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sighup = signal(SignalKind::hangup())?;
        loop {
            let next_maintenance = if self.unresolved {
                UNRESOLVED_RETRY
            } else {
                MAINTENANCE_PERIOD
            };
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sighup.recv() => self.reload().await,
                _ = tokio::time::sleep(next_maintenance) => self.maintain().await,
            }
        }
        self.dataplane.detach()?;
        log::info!("detached from {}", self.config.agent.interface);
        print!("{}", self.summary());
        Ok(())
    }

    /// Re-reads the config file; on error the running state is unchanged.
    async fn reload(&mut self) {
        let config = match Config::load(&self.config_path) {
            Ok(config) => config,
            Err(err) => {
                log::error!("reload rejected, keeping the running configuration: {err:#}");
                return;
            }
        };
        let old = &self.config.agent;
        let new = &config.agent;
        if old.interface != new.interface
            || old.xdp_mode != new.xdp_mode
            || old.ring_size.get_ref() != new.ring_size.get_ref()
            || old.max_services.get_ref() != new.max_services.get_ref()
            || old.conntrack_size != new.conntrack_size
            || old.udp_idle_timeout_s != new.udp_idle_timeout_s
        {
            log::warn!(
                "reload: [agent] changes take effect only after a restart; applying [[service]] changes"
            );
        }
        self.config.services = config.services;
        self.unresolved = !self.refresh_desired().await;
        match self.reconcile() {
            Ok(()) => log::info!("reloaded {}", self.config_path.display()),
            Err(err) => log::error!("reload: {err:#}"),
        }
    }

    async fn maintain(&mut self) {
        let was_unresolved = self.unresolved;
        self.unresolved = !self.refresh_desired().await;
        if was_unresolved && !self.unresolved {
            log::info!("all backends resolved");
        }
        if let Err(err) = self.reconcile() {
            log::error!("{err:#}");
        }
        if self.reconciler.retired().is_empty() {
            return;
        }
        match self.dataplane.referenced_backends() {
            Ok(referenced) => {
                let writes = self.reconciler.collect_retired(&referenced);
                if let Err(err) = self.dataplane.apply(&writes) {
                    log::error!("freeing retired backends: {err:#}");
                }
            }
            Err(err) => log::error!("scanning the connection table: {err:#}"),
        }
    }

    /// Desired state from the config, with each backend's L2 path resolved.
    /// Returns whether every backend was resolved.
    async fn refresh_desired(&mut self) -> bool {
        let addresses: Vec<IpAddr> = self
            .config
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| *b.address.get_ref()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let paths = self.netlink.resolve_all(&addresses, RESOLVE_TIMEOUT).await;
        let mut all_resolved = true;
        let mut desired = Vec::with_capacity(self.config.services.len());
        for service in &self.config.services {
            let mut backends = Vec::with_capacity(service.backends.len());
            for backend in &service.backends {
                let address = *backend.address.get_ref();
                let path = match paths.get(&address) {
                    Some(Ok(path)) => Some(*path),
                    Some(Err(err)) => {
                        log::warn!(
                            "service {}: backend {address} unreachable, left out: {err}",
                            service.name.get_ref()
                        );
                        all_resolved = false;
                        None
                    }
                    None => None,
                };
                backends.push(DesiredBackend {
                    address,
                    weight: backend.weight.0,
                    path,
                });
            }
            desired.push(DesiredService {
                name: service.name.get_ref().clone(),
                vip: *service.vip.get_ref(),
                protocol: service.protocol,
                backends,
            });
        }
        self.desired = desired;
        all_resolved
    }

    fn reconcile(&mut self) -> Result<()> {
        let (writes, errors) = self.reconciler.plan(&self.desired);
        for err in errors {
            log::error!("{err}");
        }
        if !writes.is_empty() {
            log::debug!("applying {} map write(s)", writes.len());
        }
        self.dataplane
            .apply(&writes)
            .context("updating the data plane")
    }

    /// Per-service and per-backend counters, for the log at exit.
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
            let line: Vec<String> = globals
                .iter()
                .map(|(c, v)| format!("{}={v}", c.name()))
                .collect();
            out += &format!("  global: {}\n", line.join(" "));
        }
        out
    }
}
