//! `xdplb register`: the heartbeat sidecar a backend runs. It writes the
//! backend's key with a lease of `ttl` seconds and keeps the lease alive;
//! on SIGTERM or SIGINT it deletes the key (the agent removes the backend at
//! once); if it dies, the lease expires and etcd deletes the key. When etcd
//! is unreachable it retries with back-off and registers again once back.

use std::{convert::Infallible, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use etcd_client::{Client, PutOptions};
use tokio::signal::unix::{SignalKind, signal};

use super::{
    Registration,
    etcd::{EtcdSettings, within},
};
use crate::config::BackendAddress;

const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

pub struct Registrant {
    pub settings: EtcdSettings,
    pub prefix: String,
    pub service: String,
    pub address: BackendAddress,
    pub registration: Registration,
    pub ttl_s: i64,
}

impl Registrant {
    pub fn key(&self) -> String {
        format!("{}{}/{}", self.prefix, self.service, self.address)
    }

    /// Runs until SIGTERM/SIGINT; then deregisters.
    pub fn run(self) -> Result<String> {
        if !(1..=3600).contains(&self.ttl_s) {
            bail!("--ttl {} is out of range 1..=3600 seconds", self.ttl_s);
        }
        if self.service.is_empty() || self.service.contains('/') {
            bail!("--service {:?} is not a service name (non-empty, without '/')", self.service);
        }
        if self.registration.weight > crate::config::MAX_WEIGHT {
            bail!("--weight {} is out of range 0..={}", self.registration.weight, crate::config::MAX_WEIGHT);
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(self.register())
    }

    async fn register(self) -> Result<String> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let key = self.key();
        let value = serde_json::to_string(&self.registration)?;
        let mut lease: Option<(Client, i64)> = None;
        let mut retry = RETRY_FIRST;
        loop {
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                result = self.keep_registered(&key, &value, &mut lease) => {
                    let Err(err) = result;
                    log::warn!("register {key}: {err:#}; registering again in {retry:?}");
                    lease = None;
                    tokio::select! {
                        _ = sigterm.recv() => break,
                        _ = sigint.recv() => break,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
        self.deregister(&key, lease).await
    }

    /// Grants a lease, writes the key with it, keeps it alive at a third of
    /// the TTL; returns only on failure.
    async fn keep_registered(&self, key: &str, value: &str, slot: &mut Option<(Client, i64)>) -> Result<Infallible> {
        let mut client = self.settings.connect().await?;
        let lease = within("lease grant", client.lease_grant(self.ttl_s, None)).await?.id();
        *slot = Some((client.clone(), lease));
        within("put", client.put(key, value, Some(PutOptions::new().with_lease(lease)))).await?;
        log::info!("registered {key} = {value} with lease {lease:x} (ttl {} s)", self.ttl_s);
        let (mut keeper, mut responses) = within("lease keep-alive", client.lease_keep_alive(lease)).await?;
        let period = Duration::from_millis((self.ttl_s as u64 * 1000 / 3).max(100));
        loop {
            tokio::time::sleep(period).await;
            within("lease keep-alive", keeper.keep_alive()).await?;
            let answer = within("lease keep-alive", responses.message()).await?;
            match answer {
                Some(answer) if answer.ttl() > 0 => {}
                Some(_) => return Err(anyhow!("lease {lease:x} expired")),
                None => return Err(anyhow!("etcd ended the keep-alive stream")),
            }
        }
    }

    /// Deletes the key and revokes the lease, so the agent drops the backend now.
    async fn deregister(&self, key: &str, lease: Option<(Client, i64)>) -> Result<String> {
        let (mut client, lease) = match lease {
            Some((client, lease)) => (client, Some(lease)),
            None => (self.settings.connect().await.context("deregistering")?, None),
        };
        within("delete", client.delete(key, None)).await.with_context(|| format!("deregistering {key}"))?;
        if let Some(lease) = lease {
            // The key is gone already; a failed revoke only leaves the lease to expire.
            let _ = within("lease revoke", client.lease_revoke(lease)).await;
        }
        Ok(format!("deregistered {key}\n"))
    }
}
