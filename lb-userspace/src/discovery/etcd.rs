//! The etcd client both the agent's watch and `xdplb register` use: the
//! endpoints and their TLS and authentication settings.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::DiscoveryConfig;

/// A dead connection is noticed within about this long (HTTP/2 pings).
const KEEP_ALIVE: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A unary request (get, put, grant, revoke) that takes longer has failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl From<&DiscoveryConfig> for EtcdSettings {
    fn from(config: &DiscoveryConfig) -> Self {
        let path = |p: &Option<toml::Spanned<PathBuf>>| p.as_ref().map(|p| p.get_ref().clone());
        Self {
            endpoints: config.etcd.get_ref().clone(),
            ca_file: path(&config.ca_file),
            cert_file: path(&config.cert_file),
            key_file: path(&config.key_file),
            username: config.username.as_ref().map(|u| u.get_ref().clone()),
            password_file: path(&config.password_file),
        }
    }
}

impl EtcdSettings {
    fn options(&self) -> Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE, KEEP_ALIVE)
            .with_keep_alive_while_idle(true);
        if let Some(ca) = &self.ca_file {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&self.username, &self.password_file) {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let password = text.lines().next().unwrap_or("").to_string();
            options = options.with_user(user.clone(), password);
        }
        Ok(options)
    }

    /// A client; fails when no endpoint answers within the timeouts.
    pub async fn connect(&self) -> Result<Client> {
        let options = self.options()?;
        let endpoints = self.endpoints.join(", ");
        tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(&self.endpoints, Some(options)))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to etcd at {endpoints}: timed out"))?
            .with_context(|| format!("connecting to etcd at {endpoints}"))
    }
}

/// `request`, failed after REQUEST_TIMEOUT.
pub async fn within<T>(what: &str, request: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(result) => result.with_context(|| format!("etcd {what}")),
        Err(_) => anyhow::bail!("etcd {what}: no answer within {REQUEST_TIMEOUT:?}"),
    }
}
