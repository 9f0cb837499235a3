//! The protocol the `xdplb` CLI speaks with a running agent: one JSON object
//! per line each way. Field names are stable (fields may be added, never
//! renamed): `xdplb status --json` prints `Status` as it is.

use std::net::SocketAddr;

use crate::config::BackendAddress;

use serde::{Deserialize, Serialize};

use crate::{
    announce::{NodeState, VipAnnouncement},
    config::{Forwarding, Origin, Protocol, Scheduler},
};

pub use lb_common::MAX_REQUEST_BYTES;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {},
    BackendAdd {
        service: String,
        address: BackendAddress,
        weight: Option<u32>,
        /// Takes new flows only while no primary backend is available.
        #[serde(default)]
        backup: bool,
    },
    BackendRemove {
        service: String,
        address: BackendAddress,
    },
    BackendDrain {
        service: String,
        address: BackendAddress,
    },
    BackendEnable {
        service: String,
        address: BackendAddress,
    },
    BackendWeight {
        service: String,
        address: BackendAddress,
        weight: u32,
    },
    /// `toml` holds one `[[service]]` table, exactly as in the config file.
    ServiceAdd {
        toml: String,
    },
    ServiceRemove {
        name: String,
    },
    Reload {},
    /// End the agent; with `detach`, also remove the program and pinned state.
    Stop {
        detach: bool,
    },
    /// Withdraw every VIP (maintenance); forwarding goes on.
    NodeDrain {},
    /// Announce the VIPs again after `node_drain`.
    NodeEnable {},
    /// Switch eBPF-side debug logging (swaps in a program built for it).
    Debug {
        on: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
// One response per request: the size of `Status` is not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Response {
    Status { ok: bool, status: Status },
    Done { ok: bool, message: String },
    Error { ok: bool, error: String },
}

impl Response {
    pub fn done(message: impl Into<String>) -> Self {
        Response::Done { ok: true, message: message.into() }
    }
    pub fn error(error: impl Into<String>) -> Self {
        Response::Error { ok: false, error: error.into() }
    }
}

/// `xdplb status --json`. Field names and meanings are stable; new fields
/// may be added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub services: Vec<ServiceStatus>,
    /// A map write the kernel refused and the agent has not yet applied.
    #[serde(default)]
    pub outstanding_map_write: Option<String>,
    /// The registry, when `[discovery]` is configured.
    #[serde(default)]
    pub discovery: Option<DiscoveryStatus>,
    /// Where this agent's maps and link are pinned ([agent] pin_dir).
    #[serde(default)]
    pub pin_dir: Option<std::path::PathBuf>,
    /// Route health injection, when `[agent] announce_table` is set.
    #[serde(default)]
    pub announce: Option<AnnounceStatus>,
    /// Connection-table sync, when `[sync]` is configured.
    #[serde(default)]
    pub sync: Option<crate::sync::SyncStatus>,
}

/// The node's VIP announcements as `status` shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// The kernel routing table the routes are kept in.
    pub table: u32,
    pub node: NodeState,
    pub vips: Vec<VipAnnouncement>,
    /// The last failure to write the table, until a write succeeds.
    pub error: Option<String>,
}

/// The registry connection as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryStatus {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// The watch is established; when false, the last known pools stay.
    pub up: bool,
    /// Why it is down, or since when it is up.
    pub detail: String,
    /// The registry revision the agent's view is at.
    pub revision: i64,
    /// Backends the registry gives, over all services.
    pub backends: usize,
    /// Keys under the prefix that were skipped, each with the reason.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub scheduler: Scheduler,
    /// Client affinity in seconds; 0 = off.
    pub persistence_timeout_s: u32,
    /// Every backend is down and the service keeps them all in its ring.
    pub fail_open: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// NAT services: new flows refused for want of a source port.
    #[serde(default)]
    pub nat_port_exhausted: Option<u64>,
    /// No primary backend is available and the backups take new flows.
    #[serde(default)]
    pub backup_active: bool,
    /// Every flow the service pins is on its ring's pick (the last table
    /// scan found so, and the ring has not changed since): its SYNs skip
    /// the connection-table lookup.
    #[serde(default)]
    pub pins_follow_ring: bool,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: BackendAddress,
    /// file, cli or etcd.
    #[serde(default)]
    pub origin: Origin,
    /// A backup backend (new flows only while no primary is available).
    #[serde(default)]
    pub backup: bool,
    pub weight: u32,
    /// The weight the scheduler uses now: 0 when the backend takes no new
    /// flows; least_response_time's derived weight.
    pub effective_weight: u32,
    /// least_conn only: the data plane's live count of active flows.
    pub least_conn_active: Option<u64>,
    pub health: Health,
    pub last_probe: Option<ProbeStatus>,
    pub admin: Admin,
    /// Takes new flows right now.
    pub in_ring: bool,
    /// The neighbour is resolved (MAC known); unresolved backends get no traffic.
    pub resolved: bool,
    pub active_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// NAT services: live translations to this backend (source ports in use).
    #[serde(default)]
    pub nat_flows: Option<u64>,
    /// NAT services: source ports still free towards this backend.
    #[serde(default)]
    pub nat_free_ports: Option<u64>,
}

/// A backend's health as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
    /// Health check kind `none`.
    Unchecked,
}

/// A backend's administrative state as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    Enabled,
    /// No new flows; established ones finish.
    Draining,
    /// Draining, and no active flow is left (or the drain timed out).
    Drained,
}

impl Health {
    pub fn name(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unchecked => "unchecked",
        }
    }
}

impl Admin {
    pub const ALL: [Admin; 3] = [Admin::Enabled, Admin::Draining, Admin::Drained];

    pub fn name(self) -> &'static str {
        match self {
            Admin::Enabled => "enabled",
            Admin::Draining => "draining",
            Admin::Drained => "drained",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub ok: bool,
    pub detail: String,
    pub latency_ms: f64,
    /// Milliseconds since the probe started.
    pub age_ms: u64,
}

/// A one-service, one-backend status for tests of what reads it: `packets`
/// and `bytes` on both, a tenth of the packets as new flows.
#[cfg(test)]
pub fn sample_status(packets: u64, bytes: u64) -> Status {
    let backend = BackendStatus {
        address: "198.18.1.11".parse().unwrap(),
        origin: Origin::File,
        backup: false,
        weight: 1,
        effective_weight: 1,
        least_conn_active: None,
        health: Health::Up,
        last_probe: None,
        admin: Admin::Enabled,
        in_ring: true,
        resolved: true,
        active_flows: 4,
        packets,
        bytes,
        new_flows: packets / 10,
        nat_flows: None,
        nat_free_ports: None,
    };
    Status {
        interface: "eth0".into(),
        outstanding_map_write: None,
        discovery: None,
        pin_dir: None,
        announce: None,
        sync: None,
        services: vec![ServiceStatus {
            name: "web".into(),
            vip: "198.18.0.100:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Dsr,
            scheduler: Scheduler::Maglev,
            persistence_timeout_s: 0,
            fail_open: false,
            packets,
            bytes,
            new_flows: packets / 10,
            nat_port_exhausted: None,
            backup_active: false,
            pins_follow_ring: false,
            backends: vec![backend],
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request::BackendWeight { service: "web".into(), address: "198.18.1.11".parse().unwrap(), weight: 3 };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cmd":"backend_weight","service":"web","address":"198.18.1.11","weight":3}"#
        );
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(), Request::Status {});
    }

    #[test]
    fn malformed_requests_are_rejected() {
        for bad in [
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"backend_drain","service":"web"}"#,
            "not json",
            r#"{"cmd":"status","x":1}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_round_trip() {
        for r in [Response::done("ok"), Response::error("no such service \"x\"")] {
            let text = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
        }
    }
}
