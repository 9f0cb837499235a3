//! `xdplb run`: the agent. One event loop owns all state; configuration,
//! CLI commands and health results change the desired state, and
//! `reconcile` is the only place that turns it into map writes.
//!
//! SIGINT/SIGTERM end the agent; the XDP program stays attached with its
//! pinned maps and keeps forwarding, and the next agent adopts them
//! (`--detach-on-exit` or `xdplb stop` remove it instead). SIGHUP (or
//! `xdplb reload`) re-reads the configuration file. Changes made through the CLI live until the next
//! reload or restart: the file is the source of truth, and a reload keeps
//! only the health and drain state of backends that are still in it.

mod announce;
mod discovery;
mod maintenance;
mod nat;
mod probes;
mod requests;
mod sync;
mod systemd;
mod views;

use std::{collections::HashMap, net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    announce::{NodeState, VipAnnouncement, routes::RouteAnnouncer},
    config::{
        BackendAddress, BackendConfig, Config, HealthCheck, HealthKind, MAX_WEIGHT, Scheduler, Weight, XdpModeConfig,
    },
    control::{self, BackendStatus, ControlCall, ProbeStatus, Request, Response, ServiceStatus, Status},
    dataplane::{
        Dataplane, DataplaneParams, DebugLog, TablesInUse,
        planner::MapWrite,
        scanner::{Scanner, TableScan},
    },
    dataplane::{
        pins,
        planner::{self, Reconciler},
    },
    health::{self, ProbeReport, TunnelSlot},
    metrics::{self, Metrics, Reading},
    netlink::{L2Path, Netlink},
    state::{AdminState, DesiredService, Runtime, ServiceModes, desired_services},
};

const RESOLVE_TIMEOUT: Duration = Duration::from_millis(lb_common::NEIGHBOUR_RESOLVE_TIMEOUT_MS);
const FIRST_RESOLVE_WAIT: Duration = Duration::from_millis(lb_common::NEIGHBOUR_FIRST_WAIT_MS);
const MAINTENANCE_PERIOD: Duration = Duration::from_millis(lb_common::MAINTENANCE_PERIOD_MS);
const BUSY_MAINTENANCE_PERIOD: Duration = Duration::from_millis(lb_common::BUSY_MAINTENANCE_PERIOD_MS);
const REBALANCE_PERIOD: Duration = Duration::from_millis(lb_common::REBALANCE_PERIOD_MS);
const NETLINK_SETTLE: Duration = Duration::from_millis(lb_common::NETLINK_SETTLE_MS);

struct Checker {
    check: HealthCheck,
    generation: u64,
    task: JoinHandle<()>,
    /// The backend slot its probes are tunnelled to (through_tunnel).
    tunnel_slot: TunnelSlot,
}

pub struct Agent {
    config_path: PathBuf,
    config: Config,
    netlink: Netlink,
    dataplane: Dataplane,
    reconciler: Reconciler,
    runtime: Runtime,
    paths: HashMap<IpAddr, L2Path>,
    unresolved: bool,
    /// Backend addresses whose first resolution has been waited for.
    awaited: std::collections::HashSet<IpAddr>,
    desired: Vec<DesiredService>,
    modes: ServiceModes,
    checkers: HashMap<(String, BackendAddress), Checker>,
    next_generation: u64,
    probe_tx: mpsc::UnboundedSender<ProbeReport>,
    probe_rx: mpsc::UnboundedReceiver<ProbeReport>,
    control_rx: mpsc::Receiver<ControlCall>,
    last_maintenance: tokio::time::Instant,
    last_rebalance: tokio::time::Instant,
    metrics: Metrics,
    scrape_rx: mpsc::Receiver<oneshot::Sender<String>>,
    /// Remove the program and the pinned state at exit.
    detach_on_exit: bool,
    /// Set by `xdplb stop`: exit after answering.
    stop_requested: bool,
    /// The last map write the kernel refused, while it is not yet applied.
    outstanding_write: Option<String>,
    /// Route, neighbour and link changes announced by the kernel.
    netlink_changes: mpsc::UnboundedReceiver<()>,
    /// When to re-resolve paths after such a change (coalesced).
    resolve_at: Option<tokio::time::Instant>,
    /// `[agent] interface`'s index.
    main_ifindex: u32,
    nat: nat::NatState,
    /// The registry watch, when `[discovery]` is configured.
    discovery: Option<discovery::Discovery>,
    /// Table scans, on a thread of their own.
    scanner: Scanner,
    scan_rx: mpsc::UnboundedReceiver<TableScan>,
    /// The program is attached (VIPs may be announced).
    attached: bool,
    /// `xdplb node drain|enable`; kept across restarts in the pin directory.
    node: NodeState,
    /// The writer of `[agent] announce_table`, when set.
    announcer: Option<RouteAnnouncer>,
    /// The last announcement decision of every VIP.
    announcements: Vec<VipAnnouncement>,
    /// Connection-table sync, when `[sync]` is configured.
    sync: Option<crate::sync::Sync>,
    /// Flows the data plane pinned (sync on).
    flow_events_rx: mpsc::UnboundedReceiver<Vec<lb_common::FlowEvent>>,
    /// The peers' flows (sync on).
    synced_rx: mpsc::UnboundedReceiver<Vec<crate::sync::message::SyncedFlow>>,
}

impl Agent {
    /// Validates the config, loads the program, programs the maps, attaches,
    /// opens the control socket and starts the health checks.
    pub async fn start(config_path: PathBuf, detach_on_exit: bool) -> Result<Self> {
        let mut config = Config::load(&config_path)?;
        let netlink = Netlink::connect()?;
        let agent_config = &config.agent;
        let main_ifindex = netlink.ifindex_by_name(&agent_config.interface).await?;
        // The socket first: a second agent must fail before touching XDP.
        let listener = control::bind(&agent_config.control_socket)?;
        let mut discovery = match &config.discovery {
            Some(settings) => Some(discovery::Discovery::start(settings.get_ref(), &config.agent).await),
            None => None,
        };
        if let Some(discovery) = discovery.as_mut() {
            discovery.merge_into(&mut config);
            config.check().map_err(|e| anyhow::anyhow!("the registered backends: {e}"))?;
        }
        // The key before anything is attached: a bad one must stop the start.
        let sync_settings = match &config.sync {
            Some(sync) => Some(crate::sync::SyncSettings::load(sync.get_ref())?),
            None => None,
        };
        let agent_config = &config.agent;
        let pin_dir = pins::layout_dir(&agent_config.pin_root());
        let params = DataplaneParams::from_config(&config, Some(pin_dir.clone()));
        let mut dataplane = Dataplane::load(params.clone(), DebugLog::Off)?;
        let (flow_events_tx, flow_events_rx) = mpsc::unbounded_channel();
        let (synced_tx, synced_rx) = mpsc::unbounded_channel();
        let sync = match sync_settings {
            Some(settings) => {
                crate::sync::read_flow_events(dataplane.take_flow_events()?, flow_events_tx);
                Some(crate::sync::Sync::start(settings, synced_tx).await?)
            }
            None => None,
        };
        let adopting = dataplane.has_pinned_link();
        let reconciler = if adopting {
            let maps = dataplane.read_state().context("reading the pinned maps")?;
            let services: Vec<_> =
                config.services.iter().map(|s| (s.name.get_ref().clone(), planner::vip_key_of(s))).collect();
            let flows = dataplane.flows().map(|f| f.len()).unwrap_or(0);
            log::info!(
                "adopting the pinned state in {}: {} VIP(s), {} backend slot(s), {flows} connection-table entries",
                pin_dir.display(),
                maps.vips.len(),
                maps.backends.len()
            );
            Reconciler::adopt(params.ring_size, params.max_services, &maps, &services)
        } else {
            Reconciler::new(params.ring_size, params.max_services)
        };
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::channel(16);
        let (scrape_tx, scrape_rx) = mpsc::channel(4);
        let (scan_tx, scan_rx) = mpsc::unbounded_channel();
        let scanner = Scanner::start(&dataplane, scan_tx)?;
        let announcer = match agent_config.announce_table {
            Some(table) => Some(RouteAnnouncer::start(table, main_ifindex)?),
            None => None,
        };
        let node = pins::node_state(&agent_config.pin_root());
        let mut agent = Self {
            config_path,
            reconciler,
            config,
            netlink,
            dataplane,
            runtime: Runtime::default(),
            paths: HashMap::new(),
            unresolved: false,
            awaited: Default::default(),
            desired: Vec::new(),
            modes: ServiceModes::new(),
            checkers: HashMap::new(),
            next_generation: 0,
            probe_tx,
            probe_rx,
            control_rx,
            last_maintenance: tokio::time::Instant::now(),
            last_rebalance: tokio::time::Instant::now(),
            metrics: Metrics::default(),
            scrape_rx,
            detach_on_exit,
            stop_requested: false,
            outstanding_write: None,
            netlink_changes: Netlink::watch_changes()?,
            resolve_at: None,
            main_ifindex,
            nat: Default::default(),
            discovery,
            scanner,
            scan_rx,
            attached: false,
            node,
            announcer,
            announcements: Vec::new(),
            sync,
            flow_events_rx,
            synced_rx,
        };
        agent.runtime.sync_with(&agent.config);
        agent.runtime.local_ports = local_port_range();
        // Before the event loop runs, waiting for every backend is harmless.
        agent.resolve_within(RESOLVE_TIMEOUT).await;
        // Program the maps before attaching, so the first packet already finds its VIP.
        agent.reconcile()?;
        let mode = agent.xdp_mode();
        let adopted = agent.dataplane.attach_or_adopt(&agent.config.agent.interface, mode)?;
        agent.attached = true;
        agent.update_announcements();
        agent.sync_reply_interfaces();
        tokio::spawn(control::serve(listener, control_tx));
        if let Some(address) = agent.config.agent.metrics_listen {
            let listener = metrics::bind(address).await?;
            tokio::spawn(metrics::serve(listener, scrape_tx));
        }
        agent.sync_checkers();
        agent.attach_probe_tunnels().await;
        log::info!(
            "attached to {} ({}) with {} service(s); program {}; control socket {}",
            agent.config.agent.interface,
            if adopted { "swapped onto the pinned link".to_string() } else { format!("{mode:?} mode, new link") },
            agent.config.services.len(),
            agent.dataplane.program_id().unwrap_or(0),
            agent.config.agent.control_socket.display()
        );
        if !agent.unresolved {
            log::info!("all backends resolved");
        }
        systemd::ready(&format!(
            "forwarding on {} with {} service(s)",
            agent.config.agent.interface,
            agent.config.services.len()
        ));
        Ok(agent)
    }

    pub async fn run(mut self) -> Result<()> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sighup = signal(SignalKind::hangup())?;
        loop {
            // Deadlines, not fresh sleeps: other events must not postpone them.
            let maintenance = tokio::time::sleep_until(self.last_maintenance + self.maintenance_period());
            let rebalance = tokio::time::sleep_until(self.last_rebalance + REBALANCE_PERIOD);
            let has_lrt = self.config.services.iter().any(|s| s.scheduler == Scheduler::LeastResponseTime);
            let resolve_at = self.resolve_at;
            let resolve_soon = tokio::time::sleep_until(resolve_at.unwrap_or_else(tokio::time::Instant::now));
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sighup.recv() => {
                    systemd::reloading();
                    if let Err(err) = self.reload().await {
                        log::error!("{err}");
                    }
                    systemd::ready("configuration reloaded");
                }
                Some(report) = self.probe_rx.recv() => self.on_probe(report),
                Some(call) = self.control_rx.recv() => {
                    let response = self.on_request(call.request).await;
                    let _ = call.reply.send(response);
                    if self.stop_requested {
                        break;
                    }
                }
                event = discovery::Discovery::next(&mut self.discovery) => self.on_discovery(event).await,
                Some(reply) = self.scrape_rx.recv() => {
                    let _ = reply.send(self.scrape());
                }
                _ = maintenance => self.maintain().await,
                Some(scan) = self.scan_rx.recv() => self.on_table_scan(scan),
                Some(events) = self.flow_events_rx.recv() => self.on_flow_events(events),
                Some(flows) = self.synced_rx.recv() => self.on_synced_flows(flows),
                Some(()) = self.netlink_changes.recv() => {
                    // Coalesce a burst of changes into one re-resolution.
                    self.resolve_at.get_or_insert_with(|| tokio::time::Instant::now() + NETLINK_SETTLE);
                }
                _ = resolve_soon, if resolve_at.is_some() => {
                    self.resolve_at = None;
                    self.resolve().await;
                    self.reconcile_logged();
                }
                _ = rebalance, if has_lrt => {
                    self.last_rebalance = tokio::time::Instant::now();
                    if self.runtime.rebalance_response_time(&self.config) {
                        self.reconcile_logged();
                    }
                }
            }
        }
        systemd::stopping();
        for checker in self.checkers.values() {
            checker.task.abort();
        }
        let _ = std::fs::remove_file(&self.config.agent.control_socket);
        print!("{}", self.summary());
        // An agent that merely exits leaves its routes: the program keeps
        // forwarding. Removing the program withdraws them first.
        if self.detach_on_exit
            && let Some(announcer) = self.announcer.take()
        {
            match announcer.withdraw_all().await {
                Ok(()) => log::info!("withdrew every VIP"),
                Err(err) => log::error!("withdrawing the VIPs: {err:#}"),
            }
        }
        self.dataplane.shutdown(self.detach_on_exit)?;
        if self.detach_on_exit
            && let Some(discovery) = &self.discovery
        {
            discovery.forget();
        }
        if self.detach_on_exit {
            log::info!("detached from {} and removed the pinned state", self.config.agent.interface);
        } else {
            log::info!(
                "exiting; the XDP program stays attached to {} and keeps forwarding with the last state \
                 (pinned in {}). The next `xdplb run` adopts it; `xdplb stop` removes it",
                self.config.agent.interface,
                self.config.agent.pin_root().display()
            );
        }
        Ok(())
    }

    fn xdp_mode(&self) -> XdpMode {
        match self.config.agent.xdp_mode {
            XdpModeConfig::Driver => XdpMode::Driver,
            XdpModeConfig::Skb => XdpMode::Skb,
        }
    }

    fn maintenance_period(&self) -> Duration {
        let draining = self.runtime.backends.values().any(|b| matches!(b.admin, AdminState::Draining { .. }));
        let pending = self.unresolved || draining || self.outstanding_write.is_some();
        if pending { BUSY_MAINTENANCE_PERIOD } else { MAINTENANCE_PERIOD }
    }

    /// The one place where desired state becomes map writes.
    fn reconcile(&mut self) -> Result<()> {
        let (desired, modes) = desired_services(&self.config, &self.runtime, &self.paths);
        for (service, mode) in &modes {
            let before = self.modes.get(service).copied().unwrap_or_default();
            if mode.fail_open && !before.fail_open {
                log::error!(
                    "service {service}: EVERY backend is down; failing open: keeping all enabled backends in its ring"
                );
            } else if !mode.fail_open && before.fail_open {
                log::warn!("service {service}: a backend is up again; no longer failing open");
            }
            if mode.backup_active && !before.backup_active {
                log::warn!("service {service}: no primary backend is available; new flows go to the backups");
            } else if !mode.backup_active && before.backup_active {
                log::info!("service {service}: a primary backend is available again; new flows leave the backups");
            }
        }
        self.modes = modes;
        self.desired = desired;
        self.use_tables();
        let (writes, errors) = self.reconciler.plan(&self.desired);
        for err in errors {
            log::error!("{err}");
        }
        if !writes.is_empty() {
            log::debug!("applying {} map write(s)", writes.len());
        }
        let applied = self.apply_writes(&writes).context("updating the data plane");
        self.update_tunnel_slots();
        self.sync_reply_interfaces();
        self.update_announcements();
        applied?;
        // A full plan applied: whatever was refused before is in the maps now.
        if let Some(previous) = self.outstanding_write.take() {
            log::info!("map writes applied after an earlier refusal ({previous})");
        }
        Ok(())
    }

    /// Makes the tables the desired services need full size (a program
    /// swap, the first time a service needs one). If that fails, the
    /// services that need a missing table stay out of the maps until a
    /// later reconcile succeeds; every other service is served as before.
    fn use_tables(&mut self) {
        match self.dataplane.use_tables(TablesInUse::of(&self.desired)) {
            Ok(true) => {
                log::info!("tables in use: {:?} (program swapped in)", self.dataplane.params().tables);
            }
            Ok(false) => {}
            Err(err) => {
                let have = self.dataplane.params().tables;
                log::error!("making the affinity or NAT tables full size: {err:#}; services that need them wait");
                self.desired.retain(|service| have.covers(TablesInUse::of(std::slice::from_ref(service))));
            }
        }
    }

    /// The one place map writes are applied. A write the kernel refuses is
    /// counted, logged with its map and key, shown by `status`, and undone
    /// in the planner's record (with the writes it held back), so that the
    /// next reconcile (at most a second later) writes it again.
    fn apply_writes(&mut self, writes: &[MapWrite]) -> Result<()> {
        match self.dataplane.apply(writes) {
            Ok(()) => Ok(()),
            Err(failure) => {
                self.metrics.map_update_errors.inc();
                for write in &failure.unapplied {
                    self.reconciler.forget(write);
                }
                self.outstanding_write = Some(failure.to_string());
                Err(anyhow::anyhow!("map write refused: {failure}"))
            }
        }
    }

    fn reconcile_logged(&mut self) {
        if let Err(err) = self.reconcile() {
            log::error!("{err:#}");
        }
    }
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`, which
/// IPv6 shares), read once at start.
fn local_port_range() -> Option<crate::config::PortRange> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut ports = text.split_whitespace().map(|p| p.parse::<u16>());
    match (ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some(crate::config::PortRange { low, high }),
        _ => None,
    }
}
