//! Route health injection: which VIPs this node announces, and why.
//!
//! The agent keeps one route per announced VIP in `[agent] announce_table`;
//! a BGP speaker (BIRD, FRR, GoBGP) imports that table and exports it to the
//! routers, which spread the VIPs' traffic over every node announcing them
//! (ECMP). A VIP is announced while the program is attached, the node is not
//! drained, and one of the VIP's services has at least its
//! `announce_min_healthy` healthy backends in its ring: a node that cannot
//! serve a VIP stops attracting its traffic.

pub mod routes;

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::state::DesiredService;

/// The node's administrative state (`xdplb node drain|enable`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Announces every VIP that qualifies.
    #[default]
    Active,
    /// Maintenance: announces nothing, still forwards what arrives.
    Drained,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Drained => "drained",
        }
    }
}

/// Why a VIP is announced or not, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Announced: a service has enough healthy backends.
    Healthy,
    /// Withdrawn: no service of the VIP has announce_min_healthy healthy backends.
    TooFewHealthy,
    NodeDrained,
    NotAttached,
}

impl Cause {
    pub const ALL: [Cause; 4] = [Cause::Healthy, Cause::TooFewHealthy, Cause::NodeDrained, Cause::NotAttached];

    pub fn name(self) -> &'static str {
        match self {
            Cause::Healthy => "healthy",
            Cause::TooFewHealthy => "too_few_healthy",
            Cause::NodeDrained => "node_drained",
            Cause::NotAttached => "not_attached",
        }
    }
}

/// One VIP's announcement as `status` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAnnouncement {
    pub vip: IpAddr,
    pub announced: bool,
    pub cause: Cause,
    /// Why it is (or is not) announced, in words.
    pub reason: String,
}

/// The announcement of every VIP of `services`, in address order.
pub fn plan(services: &[DesiredService], attached: bool, node: NodeState) -> Vec<VipAnnouncement> {
    let mut by_vip: BTreeMap<IpAddr, Vec<&DesiredService>> = BTreeMap::new();
    for service in services {
        by_vip.entry(service.vip.ip()).or_default().push(service);
    }
    by_vip
        .into_iter()
        .map(|(vip, services)| {
            let serving = services.iter().find(|s| s.healthy_in_ring >= s.announce_min_healthy);
            let (cause, reason) = match (attached, node, serving) {
                (false, _, _) => (Cause::NotAttached, "the program is not attached".to_string()),
                (true, NodeState::Drained, _) => {
                    (Cause::NodeDrained, "the node is drained (xdplb node enable)".to_string())
                }
                (true, NodeState::Active, Some(s)) => (
                    Cause::Healthy,
                    format!(
                        "service {}: {} healthy backend(s) in its ring (announce_min_healthy {})",
                        s.name, s.healthy_in_ring, s.announce_min_healthy
                    ),
                ),
                (true, NodeState::Active, None) => (
                    Cause::TooFewHealthy,
                    services
                        .iter()
                        .map(|s| {
                            format!(
                                "service {}: {} healthy backend(s) in its ring, below announce_min_healthy {}",
                                s.name, s.healthy_in_ring, s.announce_min_healthy
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            };
            VipAnnouncement { vip, announced: cause == Cause::Healthy, cause, reason }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn service(name: &str, vip: &str, healthy: u32, min: u32) -> DesiredService {
        let mut service = DesiredService::dsr(name, vip.parse().unwrap(), Protocol::Tcp, Vec::new());
        service.healthy_in_ring = healthy;
        service.announce_min_healthy = min;
        service
    }

    fn announced(plan: &[VipAnnouncement]) -> Vec<(String, bool)> {
        plan.iter().map(|a| (a.vip.to_string(), a.announced)).collect()
    }

    #[test]
    fn a_vip_is_announced_while_one_of_its_services_has_enough_healthy_backends() {
        let services = [
            service("web", "198.18.0.100:80", 2, 2),
            service("web-tls", "198.18.0.100:443", 0, 1),
            service("dns", "198.18.0.53:53", 1, 2),
            service("v6", "[2001:db8::100]:80", 1, 1),
        ];
        let plan = plan(&services, true, NodeState::Active);
        let expected = [("198.18.0.53", false), ("198.18.0.100", true), ("2001:db8::100", true)];
        assert_eq!(announced(&plan), expected.map(|(vip, on)| (vip.to_string(), on)));
        assert!(plan[1].reason.contains("service web: 2 healthy"), "{}", plan[1].reason);
        assert!(plan[0].reason.contains("service dns: 1 healthy backend(s) in its ring, below announce_min_healthy 2"));
    }

    #[test]
    fn zero_means_announced_regardless_of_health() {
        let plan = plan(&[service("web", "198.18.0.100:80", 0, 0)], true, NodeState::Active);
        assert!(plan[0].announced);
    }

    #[test]
    fn nothing_is_announced_when_detached_or_drained() {
        let services = [service("web", "198.18.0.100:80", 3, 1)];
        let detached = plan(&services, false, NodeState::Active);
        assert!(!detached[0].announced);
        assert_eq!(detached[0].cause, Cause::NotAttached);
        let drained = plan(&services, true, NodeState::Drained);
        assert!(!drained[0].announced);
        assert_eq!(drained[0].cause, Cause::NodeDrained);
    }

    #[test]
    fn no_services_no_announcements() {
        assert!(plan(&[], true, NodeState::Active).is_empty());
    }
}
