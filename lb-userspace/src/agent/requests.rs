//! Control-socket requests and reloads: each changes the configuration or
//! the runtime state, then reconciles.

use std::{path::Path, time::Instant};

use anyhow::Result;

use crate::config::Origin;

use super::*;

impl Agent {
    /// Re-reads the config file. On error the running state is unchanged.
    pub(super) async fn reload(&mut self) -> Result<String, String> {
        let config = Config::load(&self.config_path)
            .map_err(|err| format!("reload rejected, keeping the running configuration: {err:#}"))?;
        if let Some(changed) = agent_section_change(&self.config, &config) {
            log::warn!("reload: [agent] {changed} takes effect only after a restart; applying [[service]] changes");
        }
        if self.config.discovery != config.discovery {
            log::warn!("reload: [discovery] changes take effect only after a restart; applying [[service]] changes");
        }
        if self.config.sync != config.sync {
            log::warn!("reload: [sync] changes take effect only after a restart; applying [[service]] changes");
        }
        let mut next = self.config.clone();
        next.services = config.services;
        self.with_discovered(&mut next);
        if let Err(err) = next.check() {
            return Err(format!(
                "reload rejected, keeping the running configuration: with the registered backends: {err}"
            ));
        }
        self.config = next;
        self.apply_config_change().await;
        let message = format!("reloaded {}", self.config_path.display());
        log::info!("{message}");
        Ok(message)
    }

    /// After the configuration changed: runtime state, checkers, paths, maps.
    pub(super) async fn apply_config_change(&mut self) {
        self.runtime.sync_with(&self.config);
        self.sync_checkers();
        self.resolve().await;
        self.reconcile_logged();
        self.attach_probe_tunnels().await;
    }

    /// Applies `change` to a copy of the configuration; if the result is
    /// valid it replaces the running one. Nothing changes on error.
    pub(super) async fn change_config(
        &mut self,
        change: impl FnOnce(&mut Config) -> Result<String, String>,
    ) -> Response {
        let mut candidate = self.config.clone();
        let changed = change(&mut candidate);
        self.with_discovered(&mut candidate);
        let message = match changed.and_then(|m| candidate.check().map(|()| m)) {
            Ok(message) => message,
            Err(err) => return Response::error(err),
        };
        self.config = candidate;
        self.apply_config_change().await;
        log::info!("{message}");
        match &self.outstanding_write {
            Some(refused) => Response::done(format!("{message}; not yet in the data plane, retrying: {refused}")),
            None => Response::done(message),
        }
    }

    pub(super) async fn on_request(&mut self, request: Request) -> Response {
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
            Request::BackendAdd { service, address, weight, backup } => {
                let weight = match checked_weight(weight.unwrap_or(1)) {
                    Ok(w) => w,
                    Err(e) => return Response::error(e),
                };
                self.change_config(|config| {
                    let s = service_mut(config, &service)?;
                    s.backends.push(BackendConfig::new(address, weight, backup, Origin::Cli));
                    Ok(format!(
                        "service {service}: backend {address} added with weight {}{}",
                        weight.0,
                        if backup { " as a backup" } else { "" }
                    ))
                })
                .await
            }
            Request::BackendRemove { service, address } => {
                self.change_config(|config| {
                    let s = service_mut(config, &service)?;
                    not_registered(s, address)?;
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
                let weight = match checked_weight(weight) {
                    Ok(w) => w,
                    Err(e) => return Response::error(e),
                };
                self.change_config(|config| {
                    let s = service_mut(config, &service)?;
                    not_registered(s, address)?;
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
            Request::NodeDrain {} => self.set_node_state(NodeState::Drained),
            Request::NodeEnable {} => self.set_node_state(NodeState::Active),
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
            Request::BackendDrain { service, address } => self.set_admin(&service, address, |admin| match admin {
                AdminState::Enabled => Ok(AdminState::Draining { since: Instant::now() }),
                other => Err(format!("already {}", other.name())),
            }),
            Request::BackendEnable { service, address } => self.set_admin(&service, address, |admin| match admin {
                AdminState::Enabled => Err("already enabled".into()),
                _ => Ok(AdminState::Enabled),
            }),
        }
    }

    pub(super) fn set_admin(
        &mut self,
        service: &str,
        address: BackendAddress,
        next: impl FnOnce(AdminState) -> Result<AdminState, String>,
    ) -> Response {
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
}

fn service_mut<'a>(config: &'a mut Config, name: &str) -> Result<&'a mut crate::config::ServiceConfig, String> {
    config.services.iter_mut().find(|s| s.name.get_ref() == name).ok_or_else(|| format!("no service named {name:?}"))
}

/// Registered backends change in the registry, not through the CLI (the
/// next event would undo it).
fn not_registered(service: &crate::config::ServiceConfig, address: BackendAddress) -> Result<(), String> {
    match service.backends.iter().find(|b| *b.address.get_ref() == address) {
        Some(b) if b.origin == Origin::Etcd => Err(format!(
            "backend {address} of service {:?} comes from etcd: change or delete its key there \
             (or stop its `xdplb register`)",
            service.name.get_ref()
        )),
        _ => Ok(()),
    }
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
        ("syn_flood_threshold", a.syn_flood_threshold != b.syn_flood_threshold),
        ("control_socket", a.control_socket != b.control_socket),
        ("pin_dir", a.pin_dir != b.pin_dir),
        ("metrics_listen", a.metrics_listen != b.metrics_listen),
        ("announce_table", a.announce_table != b.announce_table),
    ]
    .into_iter()
    .find(|(_, changed)| *changed)
    .map(|(name, _)| name)
}
