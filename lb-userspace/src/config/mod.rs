//! The TOML configuration: the schema and its parsing here, validation in
//! `validate`, errors that name the file, line and column in `error`.

mod address;
mod discovery;
mod error;
mod sync;
mod validate;

use self::error::line_column;
pub use self::{
    address::{BackendAddress, PortRange},
    discovery::{DEFAULT_DISCOVERY_PREFIX, DiscoveryConfig, check_endpoints, check_prefix},
    error::ConfigError,
    sync::SyncConfig,
    validate::is_prime,
};

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
};

use lb_common::{DEFAULT_CONNTRACK_SIZE, DEFAULT_RING_SIZE, DEFAULT_UDP_IDLE_TIMEOUT_S};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

pub use lb_common::{
    DEFAULT_FALL, DEFAULT_HEALTH_INTERVAL_MS, DEFAULT_HEALTH_TIMEOUT_MS, DEFAULT_RISE, MAX_BACKENDS_PER_SERVICE,
    MAX_WEIGHT,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    /// Where services with `discover = true` find their backends (etcd).
    #[serde(default)]
    pub discovery: Option<Spanned<DiscoveryConfig>>,
    /// Connection-table sync with the other LB nodes.
    #[serde(default)]
    pub sync: Option<Spanned<SyncConfig>>,
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
    #[serde(default = "default_conntrack_size", deserialize_with = "conntrack_size")]
    pub conntrack_size: u32,
    #[serde(default = "default_udp_idle_timeout_s", deserialize_with = "idle_timeout_s")]
    pub udp_idle_timeout_s: u64,
    /// A TCP flow silent this long no longer counts as active (drain, status).
    #[serde(default = "default_tcp_idle_timeout_s", deserialize_with = "idle_timeout_s")]
    pub tcp_idle_timeout_s: u64,
    /// New SYNs per second on one CPU above which it counts as flooded: SYNs
    /// to hash-scheduled services then record nothing (0: never).
    #[serde(default = "default_syn_flood_threshold", deserialize_with = "syn_flood_threshold")]
    pub syn_flood_threshold: u64,
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
    /// Outer source address of IPv4 tunnels; default: the address the
    /// kernel's route to each backend names (the egress interface's).
    #[serde(default)]
    pub tunnel_source_v4: Option<Spanned<std::net::Ipv4Addr>>,
    /// The same for IPv6 tunnels.
    #[serde(default)]
    pub tunnel_source_v6: Option<Spanned<std::net::Ipv6Addr>>,
    /// Flows NAT services translate at once, over all of them.
    #[serde(default = "default_nat_table_size")]
    pub nat_table_size: Spanned<u32>,
    /// A NAT flow that saw FIN or RST keeps its translation this long once
    /// silent (for the last ACKs); then its source port is free again.
    #[serde(default = "default_nat_fin_linger_s", deserialize_with = "fin_linger_s")]
    pub nat_fin_linger_s: u64,
    /// Route health injection: the kernel routing table in which the agent
    /// keeps one route per announced VIP (and nothing else), for a BGP
    /// speaker such as BIRD to export. Off when unset.
    #[serde(default, deserialize_with = "announce_table")]
    pub announce_table: Option<u32>,
}

impl AgentConfig {
    pub fn pin_root(&self) -> PathBuf {
        self.pin_dir.clone().unwrap_or_else(|| Path::new("/sys/fs/bpf/xdplb").join(&self.interface))
    }

    /// `udp_idle_timeout_s` as the data plane and the agent judge flows by
    /// (`idle_timeout_ns`).
    pub fn udp_idle_ns(&self) -> u64 {
        idle_timeout_ns(self.udp_idle_timeout_s)
    }

    /// `tcp_idle_timeout_s` as the agent judges flows by (`idle_timeout_ns`).
    pub fn tcp_idle_ns(&self) -> u64 {
        idle_timeout_ns(self.tcp_idle_timeout_s)
    }
}

/// An idle timeout in nanoseconds of table time. The data plane writes a
/// flow's last-packet time at most once per `LAST_SEEN_REFRESH_NS`, so the
/// time in its entry may be that much older than its last packet: a flow is
/// idle once its entry is older than the timeout plus that. A flow that
/// sends more often than its timeout is then never taken for idle; one that
/// stops is after the timeout, at most one refresh interval later.
pub fn idle_timeout_ns(seconds: u64) -> u64 {
    seconds.saturating_mul(lb_common::NS_PER_SEC).saturating_add(lb_common::LAST_SEEN_REFRESH_NS)
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
    /// GUE: the UDP port the backends decapsulate on.
    #[serde(default = "default_gue_port")]
    pub gue_port: Spanned<u16>,
    /// NAT: the LB's addresses backends see as the client; default: the
    /// address of the interface each backend is reached by.
    #[serde(default)]
    pub nat_source: Option<Spanned<Vec<IpAddr>>>,
    /// NAT: the source ports translations take, "LOW-HIGH".
    #[serde(default)]
    pub nat_source_ports: Option<Spanned<PortRange>>,
    /// NAT: keep the client's address (DNAT only); backends must route their
    /// replies through the LB.
    #[serde(default)]
    pub nat_preserve_client: Option<Spanned<bool>>,
    /// How new flows pick a backend.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Client affinity (IPVS persistence): new flows from a client address
    /// seen within this many seconds go to the same backend. 0 = off.
    #[serde(default, deserialize_with = "persistence_timeout_s")]
    pub persistence_timeout_s: u32,
    /// Health check of every backend; a backend may override any field.
    #[serde(default)]
    pub health: Option<Spanned<HealthSpec>>,
    /// What happens to flows pinned to a backend that fails its checks.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// A draining backend is reported drained after this long at the latest.
    #[serde(default = "default_drain_timeout_s", deserialize_with = "drain_timeout_s")]
    pub drain_timeout_s: u64,
    /// Backends also come from the registry ([discovery]), under
    /// PREFIX/NAME/; they join the ones listed here.
    #[serde(default)]
    pub discover: Option<Spanned<bool>>,
    /// Route health injection: the VIP is announced while at least this
    /// many healthy backends of this service are in its ring.
    #[serde(default = "default_announce_min_healthy", deserialize_with = "announce_min_healthy")]
    pub announce_min_healthy: u32,
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
    /// Tunnel services: probe the VIP through the tunnel to the backend (as
    /// clients reach it), not the backend's own address. Default: true for
    /// tunnel services; DSR services cannot.
    pub through_tunnel: Option<bool>,
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
    /// Probe the VIP through the tunnel to the backend: connect to this
    /// address (the VIP), and let the tc program encapsulate the probe.
    pub through_tunnel: Option<IpAddr>,
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
            through_tunnel: self.through_tunnel.or(base.through_tunnel),
        }
    }
}

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
    /// IP-in-IP to the backend's address, wherever it is routed.
    Ipip,
    /// GUE (UDP) to the backend's `gue_port`.
    Gue,
    /// Destination (and source, unless `nat_preserve_client`) rewritten:
    /// backends need no change at all.
    Nat,
}

impl Forwarding {
    pub fn is_tunnel(self) -> bool {
        matches!(self, Forwarding::Ipip | Forwarding::Gue)
    }

    /// The data plane's value (`Backend::forwarding`).
    pub fn mode(self) -> u8 {
        match self {
            Forwarding::Dsr => lb_common::forwarding::DSR,
            Forwarding::Ipip => lb_common::forwarding::IPIP,
            Forwarding::Gue => lb_common::forwarding::GUE,
            Forwarding::Nat => lb_common::forwarding::NAT,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: Spanned<BackendAddress>,
    #[serde(default = "default_weight")]
    pub weight: Weight,
    #[serde(default)]
    pub health: Option<Spanned<HealthSpec>>,
    /// Takes new flows only while no primary backend of the service is
    /// healthy and enabled (HAProxy `backup`, keepalived `sorry_server`).
    #[serde(default)]
    pub backup: bool,
    /// Where the backend comes from; not a config key.
    #[serde(skip)]
    pub origin: Origin,
}

impl BackendConfig {
    pub fn new(address: BackendAddress, weight: Weight, backup: bool, origin: Origin) -> Self {
        Self { address: Spanned::new(0..0, address), weight, health: None, backup, origin }
    }
}

/// Where a backend entry comes from: `status` shows it, and each source
/// changes only its own entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The configuration file.
    #[default]
    File,
    /// `xdplb backend add` (until the next reload).
    Cli,
    /// The registry (`[discovery] etcd`).
    Etcd,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::File => "file",
            Origin::Cli => "cli",
            Origin::Etcd => "etcd",
        }
    }
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
        let service_port = backend.address.get_ref().port_or(self.vip.get_ref().port());
        HealthCheck {
            kind: spec.kind.unwrap_or(default_kind),
            port: spec.port.unwrap_or(if service_port == 0 { lb_common::DEFAULT_HEALTH_PORT } else { service_port }),
            path: spec.path.unwrap_or_else(|| "/".into()),
            expect_status: spec.expect_status.unwrap_or_else(|| vec![lb_common::DEFAULT_HTTP_EXPECT_STATUS]),
            expect_body: spec.expect_body,
            interval: std::time::Duration::from_millis(spec.interval_ms.unwrap_or(DEFAULT_HEALTH_INTERVAL_MS)),
            timeout: std::time::Duration::from_millis(spec.timeout_ms.unwrap_or(DEFAULT_HEALTH_TIMEOUT_MS)),
            rise: spec.rise.unwrap_or(DEFAULT_RISE),
            fall: spec.fall.unwrap_or(DEFAULT_FALL),
            through_tunnel: (spec.through_tunnel.unwrap_or(true) && self.forwarding.is_tunnel())
                .then(|| self.vip.get_ref().ip()),
        }
    }
}

impl ServiceConfig {
    /// NAT: the source-port pool (default 1024-65535).
    pub fn nat_ports(&self) -> PortRange {
        self.nat_source_ports.as_ref().map(|r| *r.get_ref()).unwrap_or_default()
    }

    /// NAT: the configured source addresses (empty: each backend's route source).
    pub fn nat_sources(&self) -> &[IpAddr] {
        self.nat_source.as_ref().map_or(&[], |s| s.get_ref().as_slice())
    }

    pub fn preserves_client(&self) -> bool {
        self.nat_preserve_client.as_ref().is_some_and(|p| *p.get_ref())
    }

    /// Takes backends from the registry too.
    pub fn discovers(&self) -> bool {
        self.discover.as_ref().is_some_and(|d| *d.get_ref())
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

/// Limits of the plain numeric keys: every product the agent forms from
/// them (seconds × 10^9 for the data plane, table sizes × entry sizes) fits
/// its type with room to spare.
pub const CONNTRACK_SIZE: std::ops::RangeInclusive<u64> = 1024..=(1 << 25);
pub const IDLE_TIMEOUT_S: std::ops::RangeInclusive<u64> = 1..=30 * 86_400;
pub const FIN_LINGER_S: std::ops::RangeInclusive<u64> = 0..=3_600;
pub const PERSISTENCE_TIMEOUT_S: std::ops::RangeInclusive<u64> = 0..=86_400;
pub const DRAIN_TIMEOUT_S: std::ops::RangeInclusive<u64> = 0..=30 * 86_400;
pub const ANNOUNCE_TABLE: std::ops::RangeInclusive<u64> = 1..=u32::MAX as u64;
pub const ANNOUNCE_MIN_HEALTHY: std::ops::RangeInclusive<u64> = 0..=65_535;
/// Tables the agent must not own: it deletes every route in its table that
/// is not an announced VIP (unspec, default, main, local).
pub const RESERVED_ROUTE_TABLES: [u32; 4] = [0, 253, 254, 255];

/// An integer of `range`; the error names the key and the range, and the
/// TOML parser locates it at the value.
fn ranged<'de, D: Deserializer<'de>>(d: D, key: &str, range: std::ops::RangeInclusive<u64>) -> Result<u64, D::Error> {
    let value = i64::deserialize(d)?;
    match u64::try_from(value) {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(serde::de::Error::custom(format!("{key} {value} is out of range {range:?}"))),
    }
}

fn conntrack_size<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, "conntrack_size", CONNTRACK_SIZE).map(|v| v as u32)
}
fn idle_timeout_s<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, "idle timeout (s)", IDLE_TIMEOUT_S)
}
fn syn_flood_threshold<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, "syn_flood_threshold", lb_common::SYN_FLOOD_THRESHOLD)
}
fn fin_linger_s<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, "nat_fin_linger_s", FIN_LINGER_S)
}
fn persistence_timeout_s<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, "persistence_timeout_s", PERSISTENCE_TIMEOUT_S).map(|v| v as u32)
}
fn drain_timeout_s<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ranged(d, "drain_timeout_s", DRAIN_TIMEOUT_S)
}
fn announce_table<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let table = ranged(d, "announce_table", ANNOUNCE_TABLE)? as u32;
    if RESERVED_ROUTE_TABLES.contains(&table) {
        return Err(serde::de::Error::custom(format!(
            "announce_table {table} is a table the kernel uses itself (253 default, 254 main, 255 local): \
             xdplb removes every route in its table that is not an announced VIP, so give a table of its own"
        )));
    }
    Ok(Some(table))
}
fn announce_min_healthy<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ranged(d, "announce_min_healthy", ANNOUNCE_MIN_HEALTHY).map(|v| v as u32)
}

fn default_weight() -> Weight {
    Weight(1)
}
fn default_ring_size() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_RING_SIZE)
}
fn default_max_services() -> Spanned<u32> {
    Spanned::new(0..0, lb_common::DEFAULT_MAX_SERVICES)
}
fn default_conntrack_size() -> u32 {
    DEFAULT_CONNTRACK_SIZE
}
fn default_udp_idle_timeout_s() -> u64 {
    DEFAULT_UDP_IDLE_TIMEOUT_S
}
fn default_tcp_idle_timeout_s() -> u64 {
    lb_common::DEFAULT_TCP_IDLE_TIMEOUT_S
}
fn default_syn_flood_threshold() -> u64 {
    lb_common::DEFAULT_SYN_FLOOD_THRESHOLD
}
fn default_nat_table_size() -> Spanned<u32> {
    Spanned::new(0..0, lb_common::DEFAULT_NAT_TABLE_SIZE)
}
fn default_nat_fin_linger_s() -> u64 {
    lb_common::DEFAULT_NAT_FIN_LINGER_S
}
fn default_gue_port() -> Spanned<u16> {
    Spanned::new(0..0, lb_common::DEFAULT_GUE_PORT)
}
fn default_announce_min_healthy() -> u32 {
    1
}
fn default_drain_timeout_s() -> u64 {
    lb_common::DEFAULT_DRAIN_TIMEOUT_S
}
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/xdplb/xdplb.sock";
fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

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
        assert!(err.contains("\"198.18.1.311\" is not a backend address"), "{err}");
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
    fn announce_keys_default_off_and_refuse_the_kernels_own_tables() {
        let config = parse(GOOD).unwrap();
        assert_eq!((config.agent.announce_table, config.services[0].announce_min_healthy), (None, 1));
        let announcing = GOOD.replacen("interface = \"eth0\"", "interface = \"eth0\"\nannounce_table = 100", 1);
        let config = parse(&announcing.replacen("forwarding = \"dsr\"", "announce_min_healthy = 0", 1)).unwrap();
        assert_eq!((config.agent.announce_table, config.services[0].announce_min_healthy), (Some(100), 0));
        for table in ["254", "255", "253", "0"] {
            let err = error_of(&announcing.replace("announce_table = 100", &format!("announce_table = {table}")));
            assert!(err.starts_with("lb.toml:4:18: "), "{err}");
            assert!(err.contains("table"), "{err}");
        }
        let err = error_of(&announcing.replace("announce_table = 100", "announce_table = 254"));
        assert!(err.contains("a table the kernel uses itself"), "{err}");
        let err = error_of(&GOOD.replacen("forwarding = \"dsr\"", "announce_min_healthy = 70000", 1));
        assert!(err.starts_with("lb.toml:9:24: "), "{err}");
        assert!(err.contains("announce_min_healthy 70000 is out of range 0..=65535"), "{err}");
    }

    #[test]
    fn sync_settings_are_checked_where_they_are() {
        let with = |sync: &str| GOOD.replacen("[[service]]", &format!("{sync}\n[[service]]"), 1);
        let good =
            "[sync]\nlisten = \"198.18.2.3:7600\"\npeers = [\"198.18.2.4:7600\"]\nkey_file = \"/etc/xdplb/sync.key\"\n";
        let config = parse(&with(good)).unwrap();
        let sync = config.sync.unwrap();
        assert_eq!(sync.get_ref().peers.get_ref(), &["198.18.2.4:7600".parse::<SocketAddr>().unwrap()]);
        for (bad, message) in [
            ("peers = []", "[sync] peers lists no peer"),
            ("peers = [\"[2001:db8:2::4]:7600\"]", "is not of listen's address family"),
            ("peers = [\"198.18.2.3:7600\"]", "is this node's own listen address"),
            ("peers = [\"198.18.2.4:7600\", \"198.18.2.4:7600\"]", "is listed twice"),
            ("peers = [\"198.18.2.4:0\"]", "is not a unicast address and port"),
        ] {
            let err = error_of(&with(&good.replace("peers = [\"198.18.2.4:7600\"]", bad)));
            assert!(err.contains(message), "{bad}: {err}");
            assert!(err.starts_with("lb.toml:7:"), "{bad}: {err}");
        }
        let err = error_of(&with(&good.replace("198.18.2.3:7600", "0.0.0.0:7600")));
        assert!(err.contains("give the node's own address and a port"), "{err}");
        let err = error_of(&with(&good.replace("key_file = \"/etc/xdplb/sync.key\"\n", "")));
        assert!(err.contains("missing field `key_file`"), "{err}");
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
        assert!(err.contains("forwarding = \"dsr\" needs that"), "{err}");
        let text = GOOD.replace("weight = 2\n", "weight = 2\n\n[[service.backend]]\naddress = \"198.18.1.11\"\n");
        let err = error_of(&text);
        assert!(err.contains("duplicate backend 198.18.1.11"), "{err}");
    }

    #[test]
    fn tunnels_carry_either_family_and_probe_through_the_tunnel() {
        let tunnel = GOOD.replace("forwarding = \"dsr\"", "forwarding = \"gue\"\ngue_port = 7000");
        let mixed = tunnel.replace("198.18.1.11", "2001:db8:0:3::21");
        let config = parse(&mixed).unwrap();
        let web = &config.services[0];
        assert_eq!((web.forwarding, *web.gue_port.get_ref()), (Forwarding::Gue, 7000));
        // Tunnel services probe the VIP through the tunnel unless told not to.
        let check = web.health_check(&web.backends[0]);
        assert_eq!(check.through_tunnel, Some("198.18.0.100".parse().unwrap()));
        let off = mixed.replace("gue_port = 7000", "gue_port = 7000\n[service.health]\nthrough_tunnel = false");
        let config = parse(&off).unwrap();
        assert_eq!(config.services[0].health_check(&config.services[0].backends[0]).through_tunnel, None);
        // DSR services never do, and cannot be asked to.
        let web6 = &config.services[1];
        assert_eq!(web6.health_check(&web6.backends[0]).through_tunnel, None);
        let err = error_of(
            &GOOD.replace("forwarding = \"dsr\"", "forwarding = \"dsr\"\n[service.health]\nthrough_tunnel = true"),
        );
        assert!(err.contains("through_tunnel needs forwarding = \"ipip\" or \"gue\""), "{err}");
        // The default GUE port, and port 0 refused where it is.
        assert_eq!(*parse(GOOD).unwrap().services[0].gue_port.get_ref(), 6080);
        let err = error_of(&tunnel.replace("gue_port = 7000", "gue_port = 0"));
        assert!(err.starts_with("lb.toml:10:12: "), "{err}");
        assert!(err.contains("gue_port 0 is not a port"), "{err}");
    }

    #[test]
    fn nat_services_take_backend_ports_sources_and_a_port_pool() {
        let nat = GOOD
            .replace("forwarding = \"dsr\"", "forwarding = \"nat\"\nnat_source = [\"198.18.2.1\", \"198.18.2.2\"]\nnat_source_ports = \"40000-40999\"")
            .replace("address = \"198.18.1.11\"", "address = \"198.18.1.11:8080\"");
        let config = parse(&nat).unwrap();
        let web = &config.services[0];
        assert_eq!(web.forwarding, Forwarding::Nat);
        assert_eq!(web.nat_sources().len(), 2);
        assert_eq!(web.nat_ports(), PortRange { low: 40000, high: 40999 });
        assert!(!web.preserves_client());
        assert_eq!(web.backends[0].address.get_ref().port, Some(8080));
        // Health checks go to the backend's port.
        assert_eq!(web.health_check(&web.backends[0]).port, 8080);
        // Defaults: the whole pool, each backend's route source.
        let plain = GOOD.replace("forwarding = \"dsr\"", "forwarding = \"nat\"");
        let config = parse(&plain).unwrap();
        assert_eq!(config.services[0].nat_ports(), PortRange { low: 1024, high: 65535 });
        assert!(config.services[0].nat_sources().is_empty());
        assert_eq!(config.agent.nat_fin_linger_s, 10);
        assert_eq!(*config.agent.nat_table_size.get_ref(), 262_144);
        // An IPv6 backend with a port.
        let v6 = GOOD.replace("address = \"2001:db8:0:2::11\"", "address = \"[2001:db8:0:2::11]:8080\"");
        let err = error_of(&v6);
        assert!(err.starts_with("lb.toml:21:11: "), "{err}");
        assert!(err.contains("a backend port needs forwarding = \"nat\""), "{err}");
        parse(&v6.replace(
            "protocol = \"tcp\"\n\n[[service.backend]]\naddress = \"[2001",
            "protocol = \"tcp\"\nforwarding = \"nat\"\n\n[[service.backend]]\naddress = \"[2001",
        ))
        .unwrap();
    }

    #[test]
    fn nat_keys_are_refused_where_they_make_no_sense() {
        let with = |keys: &str| GOOD.replace("forwarding = \"dsr\"", &format!("forwarding = \"nat\"\n{keys}"));
        let err =
            error_of(&GOOD.replace("forwarding = \"dsr\"", "forwarding = \"dsr\"\nnat_source_ports = \"2000-3000\""));
        assert!(err.starts_with("lb.toml:10:20: "), "{err}");
        assert!(err.contains("nat_source_ports needs forwarding = \"nat\""), "{err}");
        let err = error_of(&with("nat_source_ports = \"3000-2000\""));
        assert!(err.starts_with("lb.toml:10:20: "), "{err}");
        assert!(err.contains("not a port range LOW-HIGH"), "{err}");
        let err = error_of(&with("nat_source = [\"2001:db8::1\"]"));
        assert!(err.starts_with("lb.toml:10:14: "), "{err}");
        assert!(err.contains("nat_source 2001:db8::1 is not a unicast address of VIP 198.18.0.100's family"), "{err}");
        let err = error_of(&with("nat_source = [\"198.18.2.1\"]\nnat_preserve_client = true"));
        assert!(err.contains("exclude each other"), "{err}");
        let nine: Vec<String> = (1..=9).map(|n| format!("\"198.18.2.{n}\"")).collect();
        let err = error_of(&with(&format!("nat_source = [{}]", nine.join(", "))));
        assert!(err.contains("at most 8 addresses"), "{err}");
        let err = error_of(&with("nat_source = [\"198.18.2.1\", \"198.18.2.1\"]"));
        assert!(err.contains("nat_source 198.18.2.1 twice"), "{err}");
        let err = error_of(&GOOD.replace("interface = \"eth0\"", "interface = \"eth0\"\nnat_table_size = 10"));
        assert!(err.starts_with("lb.toml:4:18: "), "{err}");
        assert!(err.contains("nat_table_size 10 is out of range"), "{err}");
    }

    #[test]
    fn discovery_settings_are_checked_where_they_are() {
        let with = |discovery: &str| {
            GOOD.replace("[[service]]\nname = \"web\"", &format!("{discovery}\n[[service]]\nname = \"web\""))
                .replace("forwarding = \"dsr\"", "forwarding = \"dsr\"\ndiscover = true")
        };
        let config = parse(&with("[discovery]\netcd = [\"http://198.18.0.2:2379\"]\n")).unwrap();
        assert!(config.services[0].discovers() && !config.services[1].discovers());
        let discovery = config.discovery.unwrap();
        assert_eq!(discovery.get_ref().prefix.get_ref(), DEFAULT_DISCOVERY_PREFIX);
        // discover = true without a registry.
        let err = error_of(&with(""));
        assert!(err.starts_with("lb.toml:11:12: "), "{err}");
        assert!(err.contains("discover = true needs a [discovery] section"), "{err}");
        for (section, at, message) in [
            ("etcd = []", "lb.toml:6:8: ", "lists no endpoint"),
            ("etcd = [\"198.18.0.2:2379\"]", "lb.toml:6:8: ", "is not an endpoint URL"),
            ("etcd = [\"http://198.18.0.2\"]", "lb.toml:6:8: ", "is not an endpoint URL"),
            ("etcd = [\"https://198.18.0.2:2379\"]", "lb.toml:6:8: ", "give ca_file"),
            (
                "etcd = [\"http://198.18.0.2:2379\"]\nca_file = \"ca.pem\"",
                "lb.toml:6:8: ",
                "is http, but ca_file is given: use https",
            ),
            (
                "etcd = [\"http://198.18.0.2:2379\"]\nprefix = \"xdplb\"",
                "lb.toml:7:10: ",
                "must start and end with '/'",
            ),
            (
                "etcd = [\"http://198.18.0.2:2379\"]\ncert_file = \"c.pem\"",
                "lb.toml:7:13: ",
                "cert_file needs key_file",
            ),
            ("etcd = [\"http://198.18.0.2:2379\"]\nusername = \"lb\"", "lb.toml:7:12: ", "needs password_file"),
            ("etcd = [\"http://198.18.0.2:2379\"]\npassword = \"x\"", "lb.toml:7:1: ", "unknown field `password`"),
        ] {
            let err = error_of(&with(&format!("[discovery]\n{section}\n")));
            assert!(err.starts_with(at) && err.contains(message), "{section}: {err}");
        }
    }

    #[test]
    fn backups_are_marked_per_backend() {
        let config = parse(&GOOD.replace("weight = 2", "weight = 2\nbackup = true")).unwrap();
        assert!(config.services[0].backends[0].backup);
        assert!(!config.services[1].backends[0].backup);
        assert_eq!(config.services[0].backends[0].origin, Origin::File);
    }

    #[test]
    fn numbers_names_and_addresses_outside_their_range_are_located() {
        let long_name = "x".repeat(100_000);
        let agent_key = |key: &str| GOOD.replace("interface = \"eth0\"", &format!("interface = \"eth0\"\n{key}"));
        for (text, at, message) in [
            (agent_key("conntrack_size = 0"), "lb.toml:4:18: ", "conntrack_size 0 is out of range 1024..=33554432"),
            (
                agent_key("udp_idle_timeout_s = 18446744074"),
                "lb.toml:4:22: ",
                "18446744074 is out of range 1..=2592000",
            ),
            (agent_key("tcp_idle_timeout_s = 0"), "lb.toml:4:22: ", "idle timeout (s) 0 is out of range"),
            (agent_key("nat_fin_linger_s = -1"), "lb.toml:4:20: ", "nat_fin_linger_s -1 is out of range 0..=3600"),
            (
                GOOD.replace("forwarding = \"dsr\"", "forwarding = \"dsr\"\npersistence_timeout_s = 4294967296"),
                "lb.toml:10:25: ",
                "persistence_timeout_s 4294967296 is out of range 0..=86400",
            ),
            (
                GOOD.replace("198.18.0.100:80", "224.0.0.1:80"),
                "lb.toml:7:7: ",
                "VIP 224.0.0.1 is not a unicast address",
            ),
            (GOOD.replace("198.18.0.100:80", "0.0.0.0:80"), "lb.toml:7:7: ", "VIP 0.0.0.0 is not a unicast address"),
            (GOOD.replace("[2001:db8::100]:80", "[::]:80"), "lb.toml:17:7: ", "VIP :: is not a unicast address"),
            (
                GOOD.replace("address = \"198.18.1.11\"", "address = \"198.18.0.100\""),
                "lb.toml:12:11: ",
                "backend 198.18.0.100 is the VIP of service \"web\"",
            ),
            (
                GOOD.replace("address = \"198.18.1.11\"", "address = \"255.255.255.255\""),
                "lb.toml:12:11: ",
                "backend 255.255.255.255 is not a unicast address",
            ),
            (
                GOOD.replace("name = \"web\"", &format!("name = \"{long_name}\"")),
                "lb.toml:6:8: ",
                "must be 1 to 64 characters",
            ),
            (GOOD.replace("name = \"web\"", "name = \"a/b\""), "lb.toml:6:8: ", "service name \"a/b\" must be"),
        ] {
            let err = error_of(&text);
            assert!(err.starts_with(at) && err.contains(message), "{message}: {}", &err[..err.len().min(300)]);
            assert!(err.len() < 300, "the error quotes the whole value: {} bytes", err.len());
        }
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
        let err = error_of(&GOOD.replace("forwarding = \"dsr\"", "forwarding = \"natt\""));
        assert!(err.contains("unknown variant `natt`"), "{err}");
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
