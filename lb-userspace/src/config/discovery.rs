//! `[discovery]`: the registry that services with `discover = true` take
//! backends from (etcd, v3 API).

use std::{ops::Range, path::PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Where backends live: PREFIX/SERVICE/ADDRESS.
pub const DEFAULT_DISCOVERY_PREFIX: &str = "/xdplb/services/";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// etcd endpoints: "http://HOST:PORT", or "https://HOST:PORT" with `ca_file`.
    pub etcd: Spanned<Vec<String>>,
    #[serde(default = "default_prefix")]
    pub prefix: Spanned<String>,
    /// The CA that signed the etcd servers' certificates (https endpoints).
    #[serde(default)]
    pub ca_file: Option<Spanned<PathBuf>>,
    /// A client certificate and its key, for etcd's `--client-cert-auth`.
    #[serde(default)]
    pub cert_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub key_file: Option<Spanned<PathBuf>>,
    /// etcd authentication (`etcdctl user add`).
    #[serde(default)]
    pub username: Option<Spanned<String>>,
    /// The password in a file of its own (mode 0600), so the config can be
    /// world-readable; its first line is used.
    #[serde(default)]
    pub password_file: Option<Spanned<PathBuf>>,
}

fn default_prefix() -> Spanned<String> {
    Spanned::new(0..0, DEFAULT_DISCOVERY_PREFIX.to_string())
}

impl DiscoveryConfig {
    pub(super) fn validate(&self) -> Result<(), (Range<usize>, String)> {
        if self.etcd.get_ref().is_empty() {
            return Err((self.etcd.span(), "[discovery] etcd lists no endpoint".into()));
        }
        check_endpoints(self.etcd.get_ref(), self.ca_file.is_some(), "ca_file")
            .map_err(|e| (self.etcd.span(), format!("[discovery] etcd: {e}")))?;
        check_prefix(self.prefix.get_ref()).map_err(|e| (self.prefix.span(), format!("[discovery] {e}")))?;
        match (&self.cert_file, &self.key_file) {
            (Some(cert), None) => {
                return Err((cert.span(), "[discovery] cert_file needs key_file".into()));
            }
            (None, Some(key)) => {
                return Err((key.span(), "[discovery] key_file needs cert_file".into()));
            }
            _ => {}
        }
        match (&self.username, &self.password_file) {
            (Some(user), None) => Err((user.span(), "[discovery] username needs password_file".into())),
            (None, Some(file)) => Err((file.span(), "[discovery] password_file needs username".into())),
            _ => Ok(()),
        }
    }
}

/// The endpoints the agent and `xdplb register` connect to: all https with
/// a CA (named `ca_setting` in errors; etcd-client takes TLS settings for
/// https only) or all http without.
pub fn check_endpoints(endpoints: &[String], has_ca: bool, ca_setting: &str) -> Result<(), String> {
    for endpoint in endpoints {
        match (check_endpoint(endpoint)?, has_ca) {
            (true, false) => {
                return Err(format!("{endpoint:?} is https; give {ca_setting}, the CA of etcd's certificates"));
            }
            (false, true) => return Err(format!("{endpoint:?} is http, but {ca_setting} is given: use https")),
            _ => {}
        }
    }
    Ok(())
}

/// PREFIX/SERVICE/ADDRESS keys need a prefix that is a directory.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 2 {
        return Err(format!("prefix {prefix:?} must start and end with '/'"));
    }
    Ok(())
}

/// "http://HOST:PORT" or "https://HOST:PORT"; returns whether it is https.
fn check_endpoint(endpoint: &str) -> Result<bool, String> {
    let (tls, rest) = if let Some(rest) = endpoint.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = endpoint.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err(format!("{endpoint:?} is not an endpoint URL http://HOST:PORT or https://HOST:PORT"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let port = match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !rest.contains('/') => port.parse::<u16>().ok(),
        _ => None,
    };
    match port {
        Some(port) if port > 0 => Ok(tls),
        _ => Err(format!("{endpoint:?} is not an endpoint URL http://HOST:PORT or https://HOST:PORT")),
    }
}
