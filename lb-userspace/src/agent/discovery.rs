//! Backends from the registry: the watch's events update the agent's copy
//! of the prefix; registered backends join the configured ones through the
//! same path as a reload (configuration → runtime state → reconcile).
//! While the registry is down the last known pools stay; a cache file keeps
//! them across an agent restart too.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::mpsc;

use super::*;
use crate::{
    config::{DiscoveryConfig, Origin},
    control::protocol::DiscoveryStatus,
    discovery::{self, Event, RegistryView, etcd::EtcdSettings},
};

/// A first start (no cache) waits this long for the registry's pools
/// before programming the maps, so discovered services start with backends.
const FIRST_LISTING_WAIT: Duration = Duration::from_secs(3);

pub(super) struct Discovery {
    endpoints: Vec<String>,
    prefix: String,
    view: RegistryView,
    events: mpsc::UnboundedReceiver<Event>,
    up: bool,
    /// Why it is down (while not up).
    detail: String,
    /// When the watch was last established.
    up_since: Option<tokio::time::Instant>,
    /// Keys left out, with why: logged once each.
    skipped: BTreeMap<String, String>,
    cache: PathBuf,
    _watch: JoinHandle<()>,
}

/// Where the last known registry view is kept: one file per pin directory
/// (per agent), in /run so that, like the pinned state it goes with, it
/// lasts until reboot.
pub fn cache_path(agent: &crate::config::AgentConfig) -> PathBuf {
    let pins = agent.pin_root().to_string_lossy().trim_matches('/').replace('/', "-");
    Path::new(CACHE_DIR).join(format!("discovery-{pins}.json"))
}

const CACHE_DIR: &str = "/run/xdplb";

impl Discovery {
    /// Starts the watch; returns with the pools of the cache, or of the
    /// registry's first listing (waiting at most FIRST_LISTING_WAIT).
    pub(super) async fn start(config: &DiscoveryConfig, agent: &crate::config::AgentConfig) -> Self {
        let cache = cache_path(agent);
        let cached: Option<RegistryView> =
            std::fs::read(&cache).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let (tx, events) = mpsc::unbounded_channel();
        let prefix = config.prefix.get_ref().clone();
        let watch = discovery::watch::spawn(
            EtcdSettings::from(config),
            prefix.clone(),
            cached.as_ref().map(|v| v.revision),
            tx,
        );
        let mut this = Self {
            endpoints: config.etcd.get_ref().clone(),
            prefix,
            view: cached.clone().unwrap_or_default(),
            events,
            up: false,
            detail: "connecting".into(),
            up_since: None,
            skipped: BTreeMap::new(),
            cache,
            _watch: watch,
        };
        if cached.is_some() {
            log::info!(
                "discovery: starting from the last known pools (revision {}, {}); resuming the watch",
                this.view.revision,
                this.cache.display()
            );
            return this;
        }
        let deadline = tokio::time::Instant::now() + FIRST_LISTING_WAIT;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, this.events.recv()).await {
            let done = matches!(event, Event::Snapshot { .. } | Event::Down { .. });
            this.note(&event);
            if done {
                break;
            }
        }
        this
    }

    /// Records an event; returns whether the registered backends changed.
    fn note(&mut self, event: &Event) -> bool {
        match event {
            Event::Up => {
                log::info!(
                    "discovery: watching {} at {} from revision {}",
                    self.prefix,
                    self.endpoints.join(", "),
                    self.view.revision
                );
                self.up = true;
                self.up_since = Some(tokio::time::Instant::now());
            }
            Event::Down { reason } => {
                if self.up || self.detail == "connecting" {
                    log::error!("discovery: etcd: {reason}; keeping the last known pools");
                } else {
                    log::debug!("discovery: etcd: {reason}");
                }
                self.up = false;
                self.detail = reason.clone();
            }
            Event::Snapshot { .. } | Event::Changes { .. } => {}
        }
        let changed = self.view.apply(event);
        if changed && let Err(err) = self.save() {
            log::warn!("discovery: cannot write the cache {}: {err}", self.cache.display());
        }
        changed
    }

    fn save(&self) -> std::io::Result<()> {
        if let Some(dir) = self.cache.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let partial = self.cache.with_extension("json.partial");
        std::fs::write(&partial, serde_json::to_vec(&self.view)?)?;
        std::fs::rename(&partial, &self.cache)
    }

    pub(super) async fn next(discovery: &mut Option<Discovery>) -> Event {
        match discovery {
            Some(d) => match d.events.recv().await {
                Some(event) => event,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Puts the registered backends into `config`; logs keys newly left out.
    pub(super) fn merge_into(&mut self, config: &mut Config) {
        let pools = self.view.pools(&self.prefix);
        let mut skipped = discovery::merge(config, &pools);
        skipped.extend(pools.skipped);
        for (key, reason) in &skipped {
            if self.skipped.get(key) != Some(reason) {
                log::warn!("discovery: skipping {key}: {reason}");
            }
        }
        self.skipped = skipped;
    }

    pub(super) fn status(&self, config: &Config) -> DiscoveryStatus {
        DiscoveryStatus {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            up: self.up,
            detail: match self.up_since.filter(|_| self.up) {
                Some(since) => format!("watching for {} s", since.elapsed().as_secs()),
                None => self.detail.clone(),
            },
            revision: self.view.revision,
            backends: config.services.iter().flat_map(|s| &s.backends).filter(|b| b.origin == Origin::Etcd).count(),
            skipped: self.skipped.iter().map(|(key, reason)| format!("{key}: {reason}")).collect(),
        }
    }

    /// Removes the cache (with the pinned state it belongs to).
    pub(super) fn forget(&self) {
        let _ = std::fs::remove_file(&self.cache);
    }
}

impl Agent {
    pub(super) async fn on_discovery(&mut self, event: Event) {
        let Some(discovery) = self.discovery.as_mut() else { return };
        if !discovery.note(&event) {
            return;
        }
        let mut candidate = self.config.clone();
        discovery.merge_into(&mut candidate);
        if let Err(err) = candidate.check() {
            log::error!("discovery: the registered backends do not fit the configuration ({err}); keeping the pools");
            return;
        }
        let before = registered(&self.config);
        let after = registered(&candidate);
        if before == after {
            return;
        }
        for (service, address) in before.keys().filter(|k| !after.contains_key(*k)) {
            log::info!("discovery: service {service}: backend {address} deregistered");
        }
        for ((service, address), (weight, backup)) in &after {
            match before.get(&(service.clone(), *address)) {
                None => log::info!(
                    "discovery: service {service}: backend {address} registered (weight {weight}{})",
                    if *backup { ", backup" } else { "" }
                ),
                Some(old) if old != &(*weight, *backup) => log::info!(
                    "discovery: service {service}: backend {address} now weight {weight}{}",
                    if *backup { ", backup" } else { "" }
                ),
                Some(_) => {}
            }
        }
        self.config = candidate;
        self.apply_config_change().await;
    }

    /// The registered backends merged into `config` (after a reload or a CLI change).
    pub(super) fn with_discovered(&mut self, config: &mut Config) {
        if let Some(discovery) = self.discovery.as_mut() {
            discovery.merge_into(config);
        }
    }

    pub(super) fn discovery_status(&self) -> Option<DiscoveryStatus> {
        self.discovery.as_ref().map(|d| d.status(&self.config))
    }
}

/// (service, address) → (weight, backup) of the registered backends.
fn registered(config: &Config) -> BTreeMap<(String, BackendAddress), (u32, bool)> {
    config
        .services
        .iter()
        .flat_map(|s| {
            s.backends
                .iter()
                .filter(|b| b.origin == Origin::Etcd)
                .map(move |b| ((s.name.get_ref().clone(), *b.address.get_ref()), (b.weight.0, b.backup)))
        })
        .collect()
}
