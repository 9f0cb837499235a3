//! Validation of a parsed configuration: ranges, primes, duplicates,
//! families. Errors carry the span of the offending value.

use std::{collections::HashSet, ops::Range};

use lb_common::{HEALTH_INTERVAL_MS, HEALTH_STREAK, MAX_VIPS};

use super::*;

impl Config {
    pub(super) fn validate(&self) -> Result<(), (Range<usize>, String)> {
        let ring_size = *self.agent.ring_size.get_ref();
        if !is_prime(ring_size) || ring_size < 3 {
            return Err((self.agent.ring_size.span(), format!("ring_size {ring_size} is not a prime ≥ 3")));
        }
        let max_services = *self.agent.max_services.get_ref();
        if max_services == 0 || max_services > MAX_VIPS {
            return Err((
                self.agent.max_services.span(),
                format!("max_services {max_services} is out of range 1..={MAX_VIPS}"),
            ));
        }
        if (max_services as u64) * (ring_size as u64) > u32::MAX as u64 / 4 {
            return Err((self.agent.max_services.span(), "max_services × ring_size is too large".into()));
        }
        let nat_table_size = *self.agent.nat_table_size.get_ref();
        if !(1024..=1 << 24).contains(&nat_table_size) {
            return Err((
                self.agent.nat_table_size.span(),
                format!("nat_table_size {nat_table_size} is out of range 1024..={}", 1 << 24),
            ));
        }
        if let Some(sync) = &self.sync {
            sync.get_ref().validate()?;
        }
        if let Some(discovery) = &self.discovery {
            discovery.get_ref().validate()?;
        }
        if self.services.len() > max_services as usize {
            let span = self.services[max_services as usize].name.span();
            return Err((span, format!("more than max_services = {max_services} services")));
        }
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        for service in &self.services {
            let name = service.name.get_ref();
            check_service_name(name).map_err(|e| (service.name.span(), e))?;
            if !names.insert(name.clone()) {
                return Err((service.name.span(), format!("duplicate service name {name:?}")));
            }
            let vip = *service.vip.get_ref();
            if !is_unicast(vip.ip()) {
                return Err((
                    service.vip.span(),
                    format!("service {name:?}: VIP {} is not a unicast address", vip.ip()),
                ));
            }
            if !vips.insert((vip, service.protocol)) {
                return Err((service.vip.span(), format!("duplicate VIP {vip}/{}", service.protocol)));
            }
            let candidates = lb_common::MAX_LEAST_CONN_CANDIDATES as usize;
            if service.scheduler == Scheduler::LeastConn && service.backends.len() > candidates {
                return Err((
                    service.name.span(),
                    format!("service {name:?}: least_conn takes at most {candidates} backends"),
                ));
            }
            if service.backends.len() > MAX_BACKENDS_PER_SERVICE {
                return Err((
                    service.name.span(),
                    format!("service {name:?} has more than {MAX_BACKENDS_PER_SERVICE} backends"),
                ));
            }
            if service.forwarding == Forwarding::Gue && *service.gue_port.get_ref() == 0 {
                return Err((service.gue_port.span(), format!("service {name:?}: gue_port 0 is not a port")));
            }
            let service_health = service.health.as_ref().map(|h| h.get_ref().clone()).unwrap_or_default();
            let through_tunnel = |spec: &HealthSpec| spec.through_tunnel == Some(true);
            if !service.forwarding.is_tunnel()
                && let Some(health) = service.health.as_ref().filter(|h| through_tunnel(h.get_ref()))
            {
                return Err((
                    health.span(),
                    format!("service {name:?}: through_tunnel needs forwarding = \"ipip\" or \"gue\""),
                ));
            }
            if let Some(health) = &service.health {
                health.get_ref().validate().map_err(|e| (health.span(), format!("service {name:?} health: {e}")))?;
            }
            validate_nat(service)?;
            if let Some(discover) = service.discover.as_ref().filter(|d| *d.get_ref())
                && self.discovery.is_none()
            {
                return Err((
                    discover.span(),
                    format!("service {name:?}: discover = true needs a [discovery] section with etcd endpoints"),
                ));
            }
            let mut addresses = HashSet::new();
            for backend in &service.backends {
                if let Some(health) = &backend.health {
                    health
                        .get_ref()
                        .over(&service_health)
                        .validate()
                        .map_err(|e| (health.span(), format!("backend {} health: {e}", backend.address.get_ref())))?;
                }
                let addr = *backend.address.get_ref();
                service.admits(addr).map_err(|e| (backend.address.span(), e))?;
                if let Some(other) = self.services.iter().find(|s| s.vip.get_ref().ip() == addr.ip) {
                    return Err((
                        backend.address.span(),
                        format!("backend {addr} is the VIP of service {:?}, not a backend", other.name.get_ref()),
                    ));
                }
                if !addresses.insert(addr) {
                    return Err((backend.address.span(), format!("duplicate backend {addr} in service {name:?}")));
                }
            }
        }
        Ok(())
    }
}

impl ServiceConfig {
    /// Whether `addr` can be a backend of this service, whatever its source
    /// (file, CLI, registry).
    pub fn admits(&self, addr: BackendAddress) -> Result<(), String> {
        let vip = *self.vip.get_ref();
        if !is_unicast(addr.ip) {
            return Err(format!("backend {addr} is not a unicast address"));
        }
        // A tunnel carries either family in either; L2 DSR hands the
        // client's packet over as it is, and NAT rewrites addresses in place.
        if addr.ip.is_ipv4() != vip.is_ipv4() && !self.forwarding.is_tunnel() {
            return Err(format!(
                "backend {addr} is not of the same IP family as VIP {vip} \
                 (forwarding = \"{}\" needs that; \"ipip\" and \"gue\" do not)",
                self.forwarding
            ));
        }
        if addr.port.is_some() && self.forwarding != Forwarding::Nat {
            return Err(format!(
                "backend {addr}: a backend port needs forwarding = \"nat\" (\"{}\" delivers to the VIP's port)",
                self.forwarding
            ));
        }
        Ok(())
    }
}

/// The NAT keys: only on NAT services, of the VIP's family, within limits.
fn validate_nat(service: &ServiceConfig) -> Result<(), (Range<usize>, String)> {
    let name = service.name.get_ref();
    let nat = service.forwarding == Forwarding::Nat;
    let spans = [
        ("nat_source", service.nat_source.as_ref().map(|s| s.span())),
        ("nat_source_ports", service.nat_source_ports.as_ref().map(|s| s.span())),
        ("nat_preserve_client", service.nat_preserve_client.as_ref().map(|s| s.span())),
    ];
    if !nat && let Some((key, Some(span))) = spans.into_iter().find(|(_, span)| span.is_some()) {
        return Err((span, format!("service {name:?}: {key} needs forwarding = \"nat\"")));
    }
    let Some(sources) = &service.nat_source else {
        return Ok(());
    };
    let vip = service.vip.get_ref().ip();
    if sources.get_ref().len() > lb_common::MAX_NAT_SOURCES {
        return Err((
            sources.span(),
            format!("service {name:?}: nat_source takes at most {} addresses", lb_common::MAX_NAT_SOURCES),
        ));
    }
    if service.preserves_client() && !sources.get_ref().is_empty() {
        return Err((
            sources.span(),
            format!("service {name:?}: nat_source and nat_preserve_client = true exclude each other"),
        ));
    }
    let mut seen = HashSet::new();
    for source in sources.get_ref() {
        if source.is_ipv4() != vip.is_ipv4() || source.is_unspecified() || source.is_multicast() {
            return Err((
                sources.span(),
                format!("service {name:?}: nat_source {source} is not a unicast address of VIP {vip}'s family"),
            ));
        }
        if !seen.insert(source) {
            return Err((sources.span(), format!("service {name:?}: nat_source {source} twice")));
        }
    }
    Ok(())
}

impl HealthSpec {
    pub(super) fn validate(&self) -> Result<(), String> {
        let interval = self.interval_ms.unwrap_or(DEFAULT_HEALTH_INTERVAL_MS);
        let timeout = self.timeout_ms.unwrap_or(DEFAULT_HEALTH_TIMEOUT_MS);
        if !HEALTH_INTERVAL_MS.contains(&interval) {
            return Err(format!("interval_ms {interval} is out of range {HEALTH_INTERVAL_MS:?}"));
        }
        if timeout == 0 || timeout > interval {
            return Err(format!("timeout_ms {timeout} must be between 1 and interval_ms ({interval})"));
        }
        for (name, value) in [("rise", self.rise), ("fall", self.fall)] {
            if let Some(v) = value
                && !HEALTH_STREAK.contains(&v)
            {
                return Err(format!("{name} {v} is out of range {HEALTH_STREAK:?}"));
            }
        }
        if let Some(path) = &self.path
            && !path.starts_with('/')
        {
            return Err(format!("path {path:?} must start with '/'"));
        }
        if let Some(codes) = &self.expect_status {
            if codes.is_empty() {
                return Err("expect_status is empty".into());
            }
            if let Some(bad) = codes.iter().find(|c| !lb_common::HTTP_STATUS.contains(*c)) {
                return Err(format!("expect_status {bad} is not an HTTP status"));
            }
        }
        Ok(())
    }
}

/// Service names appear in metrics labels, logs, CLI arguments and registry
/// keys (PREFIX/NAME/ADDRESS): short, and without separators or blanks.
pub const MAX_SERVICE_NAME: usize = 64;

fn check_service_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > MAX_SERVICE_NAME || !name.chars().all(allowed) {
        let shown: String = name.chars().take(MAX_SERVICE_NAME).collect();
        return Err(format!(
            "service name {shown:?}{} must be 1 to {MAX_SERVICE_NAME} characters of A-Z a-z 0-9 - _ .",
            if name.chars().count() > MAX_SERVICE_NAME { "…" } else { "" }
        ));
    }
    Ok(())
}

/// Neither unspecified, multicast, broadcast nor loopback.
fn is_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || v4.is_loopback()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.is_loopback()),
    }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}
