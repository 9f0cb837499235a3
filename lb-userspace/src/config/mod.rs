//! The TOML configuration: parsing, and validation whose errors name the
//! file, line and column of the offending value.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
};

use lb_common::{DEFAULT_CONNTRACK_SIZE, DEFAULT_RING_SIZE, DEFAULT_UDP_IDLE_TIMEOUT_S, MAX_VIPS};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

pub const MAX_WEIGHT: u32 = 1000;
/// Backend slots are shared by all services; id 0 means "none".
pub const MAX_BACKENDS_PER_SERVICE: usize = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The interface clients' packets for the VIPs arrive on.
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: XdpModeConfig,
    /// Maglev lookup-table size of every service; a prime.
    #[serde(default = "default_ring_size")]
    pub ring_size: Spanned<u32>,
    /// How many services the ring map is sized for (memory: 4 × ring_size × this).
    #[serde(default = "default_max_services")]
    pub max_services: Spanned<u32>,
    #[serde(default = "default_conntrack_size")]
    pub conntrack_size: u32,
    #[serde(default = "default_udp_idle_timeout_s")]
    pub udp_idle_timeout_s: u64,
    /// A TCP flow silent this long no longer counts as active (drain, status).
    #[serde(default = "default_tcp_idle_timeout_s")]
    pub tcp_idle_timeout_s: u64,
    /// Where the agent listens for `xdplb` CLI commands.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Where maps and the XDP link are pinned, so that forwarding and the
    /// connection table survive the agent. One directory per agent; default
    /// /sys/fs/bpf/xdplb/INTERFACE.
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics; off when unset.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl AgentConfig {
    pub fn pin_root(&self) -> PathBuf {
        self.pin_dir.clone().unwrap_or_else(|| Path::new("/sys/fs/bpf/xdplb").join(&self.interface))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    #[default]
    Driver,
    Skb,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: Spanned<String>,
    pub vip: Spanned<SocketAddr>,
    pub protocol: Protocol,
    #[serde(default)]
    pub forwarding: Forwarding,
    /// How new flows pick a backend.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Client affinity (IPVS persistence): new flows from a client address
    /// seen within this many seconds go to the same backend. 0 = off.
    #[serde(default)]
    pub persistence_timeout_s: u32,
    /// Health check of every backend; a backend may override any field.
    #[serde(default)]
    pub health: Option<Spanned<HealthSpec>>,
    /// What happens to flows pinned to a backend that fails its checks.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// A draining backend is reported drained after this long at the latest.
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: u64,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Scheduler {
    /// Consistent hashing of the five-tuple: the same decision on every LB node.
    #[default]
    Maglev,
    RoundRobin,
    WeightedRoundRobin,
    Random,
    /// The client address only: one client, one backend (while the set is stable).
    SourceHash,
    /// Fewest active flows per unit of weight.
    LeastConn,
    /// Weights derived from each backend's measured response time.
    LeastResponseTime,
}

impl Scheduler {
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::RoundRobin => "round_robin",
            Scheduler::WeightedRoundRobin => "weighted_round_robin",
            Scheduler::Random => "random",
            Scheduler::SourceHash => "source_hash",
            Scheduler::LeastConn => "least_conn",
            Scheduler::LeastResponseTime => "least_response_time",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Pinned flows move to another backend on their next packet.
    #[default]
    Reschedule,
    /// Pinned flows stay on the failed backend.
    Keep,
}

/// A health-check table as written; unset fields fall back to the service's
/// table, then to the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    pub kind: Option<HealthKind>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub expect_status: Option<Vec<u16>>,
    /// The response body must contain this.
    pub expect_body: Option<String>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
    None,
}

/// The health check one backend gets, all fields resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: HealthKind,
    pub port: u16,
    pub path: String,
    pub expect_status: Vec<u16>,
    pub expect_body: Option<String>,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    pub rise: u32,
    pub fall: u32,
}

impl HealthSpec {
    /// `self` over `base`: fields set here win.
    fn over(&self, base: &HealthSpec) -> HealthSpec {
        HealthSpec {
            kind: self.kind.or(base.kind),
            port: self.port.or(base.port),
            path: self.path.clone().or_else(|| base.path.clone()),
            expect_status: self.expect_status.clone().or_else(|| base.expect_status.clone()),
            expect_body: self.expect_body.clone().or_else(|| base.expect_body.clone()),
            interval_ms: self.interval_ms.or(base.interval_ms),
            timeout_ms: self.timeout_ms.or(base.timeout_ms),
            rise: self.rise.or(base.rise),
            fall: self.fall.or(base.fall),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let interval = self.interval_ms.unwrap_or(DEFAULT_HEALTH_INTERVAL_MS);
        let timeout = self.timeout_ms.unwrap_or(DEFAULT_HEALTH_TIMEOUT_MS);
        if !(50..=3_600_000).contains(&interval) {
            return Err(format!("interval_ms {interval} is out of range 50..=3600000"));
        }
        if timeout == 0 || timeout > interval {
            return Err(format!("timeout_ms {timeout} must be between 1 and interval_ms ({interval})"));
        }
        for (name, value) in [("rise", self.rise), ("fall", self.fall)] {
            if let Some(v) = value
                && !(1..=100).contains(&v)
            {
                return Err(format!("{name} {v} is out of range 1..=100"));
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
            if let Some(bad) = codes.iter().find(|c| !(100..=599).contains(*c)) {
                return Err(format!("expect_status {bad} is not an HTTP status"));
            }
        }
        Ok(())
    }
}

pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 500;
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&value_name(*self))
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&value_name(*self))
    }
}

/// The name a config enum has in the file and on the command line.
pub fn value_name<T: clap::ValueEnum>(value: T) -> String {
    value.to_possible_value().expect("no skipped variants").get_name().to_string()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// L2 direct server return: only MAC addresses are rewritten.
    #[default]
    Dsr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: Spanned<IpAddr>,
    #[serde(default = "default_weight")]
    pub weight: Weight,
    #[serde(default)]
    pub health: Option<Spanned<HealthSpec>>,
}

impl ServiceConfig {
    /// The health check of one of this service's backends. TCP services are
    /// checked with a TCP connect to the service port unless told otherwise;
    /// UDP services are not checked unless told how.
    pub fn health_check(&self, backend: &BackendConfig) -> HealthCheck {
        let none = HealthSpec::default();
        let service = self.health.as_ref().map_or(&none, |h| h.get_ref());
        let spec = backend.health.as_ref().map_or(&none, |h| h.get_ref()).over(service);
        let default_kind = match self.protocol {
            Protocol::Tcp => HealthKind::Tcp,
            Protocol::Udp => HealthKind::None,
        };
        let service_port = self.vip.get_ref().port();
        HealthCheck {
            kind: spec.kind.unwrap_or(default_kind),
            port: spec.port.unwrap_or(if service_port == 0 { 80 } else { service_port }),
            path: spec.path.unwrap_or_else(|| "/".into()),
            expect_status: spec.expect_status.unwrap_or_else(|| vec![200]),
            expect_body: spec.expect_body,
            interval: std::time::Duration::from_millis(spec.interval_ms.unwrap_or(DEFAULT_HEALTH_INTERVAL_MS)),
            timeout: std::time::Duration::from_millis(spec.timeout_ms.unwrap_or(DEFAULT_HEALTH_TIMEOUT_MS)),
            rise: spec.rise.unwrap_or(DEFAULT_RISE),
            fall: spec.fall.unwrap_or(DEFAULT_FALL),
        }
    }
}

/// A backend weight, 0..=MAX_WEIGHT; 0 keeps the backend out of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weight(pub u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(d)?;
        if !(0..=MAX_WEIGHT as i64).contains(&value) {
            return Err(serde::de::Error::custom(format!("weight {value} is out of range 0..={MAX_WEIGHT}")));
        }
        Ok(Weight(value as u32))
    }
}

fn default_weight() -> Weight {
    Weight(1)
}
fn default_ring_size() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_RING_SIZE)
}
fn default_max_services() -> Spanned<u32> {
    Spanned::new(0..0, 64)
}
fn default_conntrack_size() -> u32 {
    DEFAULT_CONNTRACK_SIZE
}
fn default_udp_idle_timeout_s() -> u64 {
    DEFAULT_UDP_IDLE_TIMEOUT_S
}
fn default_tcp_idle_timeout_s() -> u64 {
    900
}
fn default_drain_timeout_s() -> u64 {
    300
}
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/xdplb/xdplb.sock";
fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

/// A configuration error, located in its file.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.path.display(), self.line, self.column, self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read config: {e}", path.display()))?;
        Ok(Config::parse(&text, path)?)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let located = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_column(text, span.map_or(0, |s| s.start));
            ConfigError { path: path.to_path_buf(), line, column, message }
        };
        let config: Config = toml::from_str(text).map_err(|e| located(e.span(), e.message().to_string()))?;
        config.validate().map_err(|(span, message)| located(Some(span), message))?;
        Ok(config)
    }

    /// Validation without locations, for configurations changed at run time.
    pub fn check(&self) -> Result<(), String> {
        self.validate().map_err(|(_, message)| message)
    }

    /// Parses `[[service]]` tables alone (the control socket's `service add`).
    pub fn parse_services(text: &str, origin: &Path) -> Result<Vec<ServiceConfig>, ConfigError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Services {
            #[serde(rename = "service")]
            services: Vec<ServiceConfig>,
        }
        toml::from_str::<Services>(text).map(|s| s.services).map_err(|e| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            ConfigError { path: origin.to_path_buf(), line, column, message: e.message().to_string() }
        })
    }

    fn validate(&self) -> Result<(), (Range<usize>, String)> {
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
        if self.services.len() > max_services as usize {
            let span = self.services[max_services as usize].name.span();
            return Err((span, format!("more than max_services = {max_services} services")));
        }
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        for service in &self.services {
            let name = service.name.get_ref();
            if name.is_empty() || !names.insert(name.clone()) {
                return Err((service.name.span(), format!("duplicate or empty service name {name:?}")));
            }
            let vip = *service.vip.get_ref();
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
            let service_health = service.health.as_ref().map(|h| h.get_ref().clone()).unwrap_or_default();
            if let Some(health) = &service.health {
                health.get_ref().validate().map_err(|e| (health.span(), format!("service {name:?} health: {e}")))?;
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
                if addr.is_ipv4() != vip.is_ipv4() {
                    return Err((
                        backend.address.span(),
                        format!("backend {addr} is not of the same IP family as VIP {vip}"),
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

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.chars().count(), |nl| before[nl + 1..].chars().count()) + 1;
    (line, column)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("lb.toml"))
    }

    const GOOD: &str = r#"
[agent]
interface = "eth0"

[[service]]
name = "web"
vip = "198.18.0.100:80"
protocol = "tcp"
forwarding = "dsr"

[[service.backend]]
address = "198.18.1.11"
weight = 2

[[service]]
name = "web6"
vip = "[2001:db8::100]:80"
protocol = "tcp"

[[service.backend]]
address = "2001:db8:0:2::11"
"#;

    #[test]
    fn parses_a_good_config_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.agent.xdp_mode, XdpModeConfig::Driver);
        assert_eq!(*config.agent.ring_size.get_ref(), 65537);
        assert_eq!(config.services.len(), 2);
        assert_eq!(config.services[0].backends[0].weight, Weight(2));
        assert_eq!(config.services[1].backends[0].weight, Weight(1));
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_is_located() {
        let text = GOOD.replace("forwarding = \"dsr\"", "forwardin = \"dsr\"");
        let err = error_of(&text);
        assert!(err.starts_with("lb.toml:9:1: "), "{err}");
        assert!(err.contains("unknown field `forwardin`"), "{err}");
    }

    #[test]
    fn bad_address_is_located() {
        let err = error_of(&GOOD.replace("198.18.1.11", "198.18.1.311"));
        assert!(err.starts_with("lb.toml:12:11: "), "{err}");
        assert!(err.contains("invalid IP address"), "{err}");
    }

    #[test]
    fn weight_out_of_range_is_located() {
        let err = error_of(&GOOD.replace("weight = 2", "weight = 1001"));
        assert!(err.starts_with("lb.toml:13:10: "), "{err}");
        assert!(err.contains("weight 1001 is out of range 0..=1000"), "{err}");
        let err = error_of(&GOOD.replace("weight = 2", "weight = -1"));
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn duplicate_vip_is_located() {
        let err =
            error_of(&GOOD.replace("[2001:db8::100]:80", "198.18.0.100:80").replace("2001:db8:0:2::11", "198.18.1.12"));
        assert!(err.starts_with("lb.toml:17:7: "), "{err}");
        assert!(err.contains("duplicate VIP 198.18.0.100:80/tcp"), "{err}");
    }

    #[test]
    fn same_vip_on_udp_and_tcp_is_allowed() {
        let text = GOOD.replace("[2001:db8::100]:80", "198.18.0.100:80").replace("2001:db8:0:2::11", "198.18.1.12");
        let text = text.replacen(
            "protocol = \"tcp\"\n\n[[service.backend]]\naddress = \"198.18.1.12\"",
            "protocol = \"udp\"\n\n[[service.backend]]\naddress = \"198.18.1.12\"",
            1,
        );
        parse(&text).unwrap();
    }

    #[test]
    fn mixed_family_and_duplicate_backends_are_rejected() {
        let err = error_of(&GOOD.replace("2001:db8:0:2::11", "198.18.1.12"));
        assert!(err.contains("not of the same IP family"), "{err}");
        let text = GOOD.replace("weight = 2\n", "weight = 2\n\n[[service.backend]]\naddress = \"198.18.1.11\"\n");
        let err = error_of(&text);
        assert!(err.contains("duplicate backend 198.18.1.11"), "{err}");
    }

    #[test]
    fn ring_size_must_be_prime() {
        let err = error_of(&GOOD.replace("interface = \"eth0\"", "interface = \"eth0\"\nring_size = 65536"));
        assert!(err.starts_with("lb.toml:4:13: "), "{err}");
        assert!(err.contains("not a prime"), "{err}");
        parse(&GOOD.replace("interface = \"eth0\"", "interface = \"eth0\"\nring_size = 251")).unwrap();
    }

    #[test]
    fn bad_enum_value_is_reported() {
        let err = error_of(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
        assert!(err.contains("unknown variant `sctp`"), "{err}");
        let err = error_of(&GOOD.replace("forwarding = \"dsr\"", "forwarding = \"nat\""));
        assert!(err.contains("unknown variant `nat`"), "{err}");
    }

    #[test]
    fn shipped_configs_are_valid() {
        for (name, text) in [
            ("config/example.toml", include_str!("../../../config/example.toml")),
            ("config/harness.toml", include_str!("../../../config/harness.toml")),
        ] {
            let config = Config::parse(text, Path::new(name)).unwrap_or_else(|e| panic!("{e}"));
            assert!(!config.services.is_empty(), "{name}");
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(2) && is_prime(251));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(65535));
    }
}
