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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    config::{BackendConfig, Config, HealthCheck, HealthKind, MAX_WEIGHT, Scheduler, Weight, XdpModeConfig},
    control::{self, BackendStatus, ControlCall, ProbeStatus, Request, Response, ServiceStatus, Status},
    dataplane::{Dataplane, DataplaneParams, DebugLog},
    health::{self, ProbeReport},
    metrics::{self, AgentMetrics},
    netlink::{L2Path, Netlink},
    pins,
    reconcile::{DesiredService, Reconciler},
    state::{AdminState, FailOpen, Runtime, desired_services},
};

/// How long one neighbour resolution may wait for an answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often neighbours are re-resolved and retired backends collected.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(5);
/// How often while something is pending (an unresolved neighbour, a drain).
const BUSY_MAINTENANCE_PERIOD: Duration = Duration::from_secs(1);
/// How often least_response_time re-derives weights from response times.
const REBALANCE_PERIOD: Duration = Duration::from_secs(2);

struct Checker {
    check: HealthCheck,
    generation: u64,
    task: JoinHandle<()>,
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
    desired: Vec<DesiredService>,
    fail_open: FailOpen,
    checkers: HashMap<(String, IpAddr), Checker>,
    next_generation: u64,
    probe_tx: mpsc::UnboundedSender<ProbeReport>,
    probe_rx: mpsc::UnboundedReceiver<ProbeReport>,
    control_rx: mpsc::Receiver<ControlCall>,
    last_maintenance: tokio::time::Instant,
    last_rebalance: tokio::time::Instant,
    metrics: AgentMetrics,
    scrape_rx: mpsc::Receiver<oneshot::Sender<String>>,
    /// Remove the program and the pinned state at exit.
    detach_on_exit: bool,
    /// Set by `xdplb stop`: exit after answering.
    stop_requested: bool,
}

impl Agent {
    /// Validates the config, loads the program, programs the maps, attaches,
    /// opens the control socket and starts the health checks.
    pub async fn start(config_path: PathBuf, detach_on_exit: bool) -> Result<Self> {
        let config = Config::load(&config_path)?;
        let netlink = Netlink::connect()?;
        let agent_config = &config.agent;
        netlink.ifindex_by_name(&agent_config.interface).await?;
        // The socket first: a second agent must fail before touching XDP.
        let listener = control::bind(&agent_config.control_socket)?;
        let pin_dir = pins::layout_dir(&agent_config.pin_root());
        let params = DataplaneParams {
            ring_size: *agent_config.ring_size.get_ref(),
            max_services: *agent_config.max_services.get_ref(),
            conntrack_size: agent_config.conntrack_size,
            udp_idle_timeout_ns: agent_config.udp_idle_timeout_s * 1_000_000_000,
            pin_dir: Some(pin_dir.clone()),
        };
        let dataplane = Dataplane::load(params.clone(), DebugLog::Off)?;
        let adopting = dataplane.has_pinned_link();
        let reconciler = if adopting {
            let maps = dataplane.read_state().context("reading the pinned maps")?;
            let services: Vec<_> =
                config.services.iter().map(|s| (s.name.get_ref().clone(), crate::reconcile::vip_key_of(s))).collect();
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
        let mut agent = Self {
            config_path,
            reconciler,
            config,
            netlink,
            dataplane,
            runtime: Runtime::default(),
            paths: HashMap::new(),
            unresolved: false,
            desired: Vec::new(),
            fail_open: FailOpen::new(),
            checkers: HashMap::new(),
            next_generation: 0,
            probe_tx,
            probe_rx,
            control_rx,
            last_maintenance: tokio::time::Instant::now(),
            last_rebalance: tokio::time::Instant::now(),
            metrics: AgentMetrics::default(),
            scrape_rx,
            detach_on_exit,
            stop_requested: false,
        };
        agent.runtime.sync_with(&agent.config);
        agent.resolve().await;
        // Program the maps before attaching, so the first packet already finds its VIP.
        agent.reconcile()?;
        let mode = match agent.config.agent.xdp_mode {
            XdpModeConfig::Driver => XdpMode::Driver,
            XdpModeConfig::Skb => XdpMode::Skb,
        };
        let adopted = agent.dataplane.attach_or_adopt(&agent.config.agent.interface, mode)?;
        tokio::spawn(control::serve(listener, control_tx));
        if let Some(address) = agent.config.agent.metrics_listen {
            let listener = metrics::bind(address).await?;
            tokio::spawn(metrics::serve(listener, scrape_tx));
        }
        agent.sync_checkers();
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
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sighup.recv() => {
                    if let Err(err) = self.reload().await {
                        log::error!("{err}");
                    }
                }
                Some(report) = self.probe_rx.recv() => self.on_probe(report),
                Some(call) = self.control_rx.recv() => {
                    let response = self.on_request(call.request).await;
                    let _ = call.reply.send(response);
                    if self.stop_requested {
                        break;
                    }
                }
                Some(reply) = self.scrape_rx.recv() => {
                    let _ = reply.send(self.scrape());
                }
                _ = maintenance => self.maintain().await,
                _ = rebalance, if has_lrt => {
                    self.last_rebalance = tokio::time::Instant::now();
                    if self.runtime.rebalance_response_time(&self.config) {
                        self.reconcile_logged();
                    }
                }
            }
        }
        for checker in self.checkers.values() {
            checker.task.abort();
        }
        let _ = std::fs::remove_file(&self.config.agent.control_socket);
        print!("{}", self.summary());
        self.dataplane.shutdown(self.detach_on_exit)?;
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

    fn maintenance_period(&self) -> Duration {
        let draining = self.runtime.backends.values().any(|b| matches!(b.admin, AdminState::Draining { .. }));
        if self.unresolved || draining { BUSY_MAINTENANCE_PERIOD } else { MAINTENANCE_PERIOD }
    }

    /// The one place where desired state becomes map writes.
    fn reconcile(&mut self) -> Result<()> {
        let (desired, fail_open) = desired_services(&self.config, &self.runtime, &self.paths);
        for (service, failing) in &fail_open {
            if *failing && !self.fail_open.get(service).copied().unwrap_or(false) {
                log::error!(
                    "service {service}: EVERY backend is down; failing open: keeping all enabled backends in its ring"
                );
            } else if !*failing && self.fail_open.get(service).copied().unwrap_or(false) {
                log::warn!("service {service}: a backend is up again; no longer failing open");
            }
        }
        self.fail_open = fail_open;
        self.desired = desired;
        let (writes, errors) = self.reconciler.plan(&self.desired);
        for err in errors {
            log::error!("{err}");
        }
        if !writes.is_empty() {
            log::debug!("applying {} map write(s)", writes.len());
        }
        self.dataplane.apply(&writes).context("updating the data plane")
    }

    fn reconcile_logged(&mut self) {
        if let Err(err) = self.reconcile() {
            log::error!("{err:#}");
        }
    }

    fn on_probe(&mut self, report: ProbeReport) {
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
        let labels = AgentMetrics::labels(&report.service, report.address);
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
    fn sync_checkers(&mut self) {
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
            let task = tokio::spawn(health::run_checker(
                key.0.clone(),
                key.1,
                check.clone(),
                generation,
                self.probe_tx.clone(),
            ));
            self.checkers.insert(key, Checker { check, generation, task });
        }
    }

    /// Resolves every configured backend's L2 path.
    async fn resolve(&mut self) {
        let addresses: Vec<IpAddr> = self
            .config
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| *b.address.get_ref()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let results = self.netlink.resolve_all(&addresses, RESOLVE_TIMEOUT).await;
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

    async fn maintain(&mut self) {
        self.last_maintenance = tokio::time::Instant::now();
        self.resolve().await;
        let tcp_idle_ns = self.config.agent.tcp_idle_timeout_s * 1_000_000_000;
        match self.dataplane.scan_flows(tcp_idle_ns) {
            Ok(scan) => {
                self.update_active_flows(&scan.active);
                for (service, address, why) in self.runtime.advance_drains(&self.config, Instant::now()) {
                    log::info!("service {service}: backend {address} drained ({why})");
                }
                let mut writes = self.reconciler.collect_retired(&scan.referenced);
                let least_conn = self.reconciler.least_conn_backends();
                if !least_conn.is_empty() {
                    match self.dataplane.least_conn_counts(&least_conn) {
                        Ok(counted) => writes.extend(self.reconciler.active_corrections(&scan.active, &counted)),
                        Err(err) => log::error!("reading least_conn counts: {err:#}"),
                    }
                }
                if let Err(err) = self.dataplane.apply(&writes) {
                    log::error!("maintenance map writes: {err:#}");
                }
            }
            Err(err) => log::error!("scanning the connection table: {err:#}"),
        }
        self.reconcile_logged();
    }

    fn update_active_flows(&mut self, active: &HashMap<u32, u64>) {
        for ((service, address), state) in &mut self.runtime.backends {
            let id = self.reconciler.backend_id(service, *address);
            state.active_flows = id.and_then(|id| active.get(&id)).copied().unwrap_or(0);
        }
    }

    /// Re-reads the config file. On error the running state is unchanged.
    async fn reload(&mut self) -> Result<String, String> {
        let config = Config::load(&self.config_path)
            .map_err(|err| format!("reload rejected, keeping the running configuration: {err:#}"))?;
        if let Some(changed) = agent_section_change(&self.config, &config) {
            log::warn!("reload: [agent] {changed} takes effect only after a restart; applying [[service]] changes");
        }
        self.config.services = config.services;
        self.apply_config_change().await;
        let message = format!("reloaded {}", self.config_path.display());
        log::info!("{message}");
        Ok(message)
    }

    /// After the configuration changed: runtime state, checkers, paths, maps.
    async fn apply_config_change(&mut self) {
        self.runtime.sync_with(&self.config);
        self.sync_checkers();
        self.resolve().await;
        self.reconcile_logged();
    }

    /// Applies `change` to a copy of the configuration; if the result is
    /// valid it replaces the running one. Nothing changes on error.
    async fn change_config(&mut self, change: impl FnOnce(&mut Config) -> Result<String, String>) -> Response {
        let mut candidate = self.config.clone();
        let message = match change(&mut candidate).and_then(|m| candidate.check().map(|()| m)) {
            Ok(message) => message,
            Err(err) => return Response::error(err),
        };
        self.config = candidate;
        self.apply_config_change().await;
        log::info!("{message}");
        Response::done(message)
    }

    async fn on_request(&mut self, request: Request) -> Response {
        match request {
            Request::Status {} => match self.status() {
                Ok(status) => Response::Status { ok: true, status },
                Err(err) => Response::error(format!("{err:#}")),
            },
            Request::Reload {} => match self.reload().await {
                Ok(message) => Response::done(message),
                Err(err) => {
                    log::error!("{err}");
                    Response::error(err)
                }
            },
            Request::ServiceAdd { toml } => {
                let services = match Config::parse_services(&toml, Path::new("<service add>")) {
                    Ok(services) => services,
                    Err(err) => return Response::error(err.to_string()),
                };
                self.change_config(|config| {
                    let [service] = <[_; 1]>::try_from(services).map_err(|_| "give exactly one [[service]]")?;
                    let message = format!("service {} added", service.name.get_ref());
                    config.services.push(service);
                    Ok(message)
                })
                .await
            }
            Request::ServiceRemove { name } => {
                self.change_config(|config| {
                    let before = config.services.len();
                    config.services.retain(|s| *s.name.get_ref() != name);
                    if config.services.len() == before {
                        return Err(format!("no service named {name:?}"));
                    }
                    Ok(format!("service {name} removed"))
                })
                .await
            }
            Request::BackendAdd { service, address, weight } => {
                let address = match parse_address(&address) {
                    Ok(address) => address,
                    Err(err) => return err,
                };
                let weight = match checked_weight(weight.unwrap_or(1)) {
                    Ok(w) => w,
                    Err(e) => return Response::error(e),
                };
                self.change_config(|config| {
                    let s = service_mut(config, &service)?;
                    s.backends.push(BackendConfig { address: toml::Spanned::new(0..0, address), weight, health: None });
                    Ok(format!("service {service}: backend {address} added with weight {}", weight.0))
                })
                .await
            }
            Request::BackendRemove { service, address } => {
                let address = match parse_address(&address) {
                    Ok(address) => address,
                    Err(err) => return err,
                };
                self.change_config(|config| {
                    let s = service_mut(config, &service)?;
                    let before = s.backends.len();
                    s.backends.retain(|b| *b.address.get_ref() != address);
                    if s.backends.len() == before {
                        return Err(format!("service {service:?} has no backend {address}"));
                    }
                    Ok(format!("service {service}: backend {address} removed"))
                })
                .await
            }
            Request::BackendWeight { service, address, weight } => {
                let address = match parse_address(&address) {
                    Ok(address) => address,
                    Err(err) => return err,
                };
                let weight = match checked_weight(weight) {
                    Ok(w) => w,
                    Err(e) => return Response::error(e),
                };
                self.change_config(|config| {
                    let s = service_mut(config, &service)?;
                    let backend = s
                        .backends
                        .iter_mut()
                        .find(|b| *b.address.get_ref() == address)
                        .ok_or_else(|| format!("service {service:?} has no backend {address}"))?;
                    backend.weight = weight;
                    Ok(format!("service {service}: backend {address} weight {}", weight.0))
                })
                .await
            }
            Request::Stop { detach } => {
                self.stop_requested = true;
                self.detach_on_exit |= detach;
                Response::done(if detach {
                    "stopping; detaching the program and removing the pinned state"
                } else {
                    "stopping; the program stays attached"
                })
            }
            Request::Debug { on } => {
                let wanted = if on { DebugLog::On } else { DebugLog::Off };
                if self.dataplane.debug_log() == wanted {
                    return Response::done(format!("eBPF debug logging already {}", if on { "on" } else { "off" }));
                }
                match self.dataplane.set_debug_log(wanted) {
                    Ok(()) => {
                        let message = format!(
                            "eBPF debug logging {} (program {} swapped in)",
                            if on { "on" } else { "off" },
                            self.dataplane.program_id().unwrap_or(0)
                        );
                        log::info!("{message}");
                        Response::done(message)
                    }
                    Err(err) => Response::error(format!("{err:#}")),
                }
            }
            Request::BackendDrain { service, address } => self.set_admin(&service, &address, |admin| match admin {
                AdminState::Enabled => Ok(AdminState::Draining { since: Instant::now() }),
                other => Err(format!("already {}", other.name())),
            }),
            Request::BackendEnable { service, address } => self.set_admin(&service, &address, |admin| match admin {
                AdminState::Enabled => Err("already enabled".into()),
                _ => Ok(AdminState::Enabled),
            }),
        }
    }

    fn set_admin(
        &mut self,
        service: &str,
        address: &str,
        next: impl FnOnce(AdminState) -> Result<AdminState, String>,
    ) -> Response {
        let address = match parse_address(address) {
            Ok(address) => address,
            Err(err) => return err,
        };
        if !self.config.services.iter().any(|s| s.name.get_ref() == service) {
            return Response::error(format!("no service named {service:?}"));
        }
        let Some(state) = self.runtime.get_mut(service, address) else {
            return Response::error(format!("service {service:?} has no backend {address}"));
        };
        match next(state.admin) {
            Ok(admin) => {
                state.admin = admin;
                let message = format!("service {service}: backend {address} {}", admin.name());
                log::info!("{message}");
                self.reconcile_logged();
                Response::done(message)
            }
            Err(err) => Response::error(format!("service {service}: backend {address} is {err}")),
        }
    }

    /// Active flows come from the last maintenance scan (every 1–5 s): a
    /// status call, a `top` refresh or a scrape must not walk the whole
    /// connection table again.
    fn status(&mut self) -> Result<Status> {
        let ring_weights: BTreeMap<(&str, IpAddr), u32> = self
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
                backends.push(BackendStatus {
                    address: address.to_string(),
                    weight: backend.weight.0,
                    effective_weight: ring_weights.get(&(name.as_str(), address)).copied().unwrap_or(0),
                    least_conn_active: id
                        .and_then(|id| least_conn.get(&id))
                        .map(|(counted, correction)| (*counted as i64 + correction).max(0) as u64),
                    health: if !checked {
                        "unchecked"
                    } else if runtime.health.up {
                        "up"
                    } else {
                        "down"
                    }
                    .into(),
                    last_probe: runtime.health.last.as_ref().map(|p| ProbeStatus {
                        ok: p.ok,
                        detail: p.detail.clone(),
                        latency_ms: p.latency.as_secs_f64() * 1000.0,
                        age_ms: now.duration_since(p.at).unwrap_or_default().as_millis() as u64,
                    }),
                    admin: runtime.admin.name().into(),
                    in_ring: id.is_some() && ring_weights.get(&(name.as_str(), address)).copied().unwrap_or(0) > 0,
                    resolved: self.paths.contains_key(&address),
                    active_flows: runtime.active_flows,
                    packets: counters.packets,
                    bytes: counters.bytes,
                    new_flows: counters.new_flows,
                });
            }
            services.push(ServiceStatus {
                name: name.clone(),
                vip: service.vip.get_ref().to_string(),
                protocol: service.protocol.to_string(),
                forwarding: "dsr".into(),
                scheduler: service.scheduler.name().into(),
                persistence_timeout_s: service.persistence_timeout_s,
                fail_open: self.fail_open.get(name).copied().unwrap_or(false),
                packets: counters.packets,
                bytes: counters.bytes,
                new_flows: counters.new_flows,
                backends,
            });
        }
        Ok(Status { interface: self.config.agent.interface.clone(), services })
    }

    fn scrape(&mut self) -> String {
        let status = match self.status() {
            Ok(status) => status,
            Err(err) => return format!("# error: {err:#}\n"),
        };
        let globals = self.dataplane.global_counters().unwrap_or_default();
        let snapshot = metrics::Snapshot {
            status: &status,
            globals: &globals,
            ring_rebuilds: self.dataplane.ring_writes,
            agent: &self.metrics,
        };
        metrics::render(&snapshot).unwrap_or_else(|err| format!("# error: {err:#}\n"))
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

fn service_mut<'a>(config: &'a mut Config, name: &str) -> Result<&'a mut crate::config::ServiceConfig, String> {
    config.services.iter_mut().find(|s| s.name.get_ref() == name).ok_or_else(|| format!("no service named {name:?}"))
}

fn parse_address(text: &str) -> Result<IpAddr, Response> {
    text.parse().map_err(|_| Response::error(format!("{text:?} is not an IP address")))
}

fn checked_weight(weight: u32) -> Result<Weight, String> {
    if weight > MAX_WEIGHT {
        return Err(format!("weight {weight} is out of range 0..={MAX_WEIGHT}"));
    }
    Ok(Weight(weight))
}

/// The first `[agent]` setting that differs, if any (those need a restart).
fn agent_section_change(old: &Config, new: &Config) -> Option<&'static str> {
    let (a, b) = (&old.agent, &new.agent);
    [
        ("interface", a.interface != b.interface),
        ("xdp_mode", a.xdp_mode != b.xdp_mode),
        ("ring_size", a.ring_size.get_ref() != b.ring_size.get_ref()),
        ("max_services", a.max_services.get_ref() != b.max_services.get_ref()),
        ("conntrack_size", a.conntrack_size != b.conntrack_size),
        ("udp_idle_timeout_s", a.udp_idle_timeout_s != b.udp_idle_timeout_s),
        ("tcp_idle_timeout_s", a.tcp_idle_timeout_s != b.tcp_idle_timeout_s),
        ("control_socket", a.control_socket != b.control_socket),
        ("pin_dir", a.pin_dir != b.pin_dir),
        ("metrics_listen", a.metrics_listen != b.metrics_listen),
    ]
    .into_iter()
    .find(|(_, changed)| *changed)
    .map(|(name, _)| name)
}
