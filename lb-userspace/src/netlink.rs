//! Kernel routing and neighbour lookups over rtnetlink: where a backend is
//! reached from (egress interface, next hop, source address, MTU) and at
//! which MAC address; and a watch on route, neighbour and link changes.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::{
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMetric},
};
use rtnetlink::{Handle, RouteMessageBuilder, sys::AsyncSocket as _};
use tokio::sync::mpsc;

// rtnetlink multicast groups (uapi rtnetlink.h, the legacy bitmask form).
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

/// How a backend is reached: the frame's interface and MAC addresses (of
/// the backend, or of the router on the way), and for tunnels the outer
/// source address and the MTU of the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Path {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The route's MTU, or the egress interface's.
    pub mtu: u16,
    /// The source address the kernel would use toward the backend.
    pub source: Option<IpAddr>,
}

/// The kernel's route to an address.
struct Route {
    ifindex: u32,
    /// The gateway, or the address itself when it is on-link.
    next_hop: IpAddr,
    source: Option<IpAddr>,
    mtu: Option<u32>,
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Reports every route, neighbour and link change the kernel announces
    /// (one `()` per message; the receiver coalesces them).
    pub fn watch_changes() -> Result<mpsc::UnboundedReceiver<()>> {
        let (mut connection, _handle, mut messages) =
            rtnetlink::new_connection().context("opening rtnetlink for change notifications")?;
        let groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&rtnetlink::sys::SocketAddr::new(0, groups))
            .context("subscribing to route, neighbour and link changes")?;
        tokio::spawn(connection);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while messages.next().await.is_some() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    pub async fn ifindex_by_name(&self, name: &str) -> Result<u32> {
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect()
            .await
            .with_context(|| format!("interface {name:?} not found"))?;
        let link = links.first().ok_or_else(|| anyhow!("interface {name:?} not found"))?;
        Ok(link.header.index)
    }

    /// An interface's MAC address and MTU.
    pub async fn link_of(&self, ifindex: u32) -> Result<([u8; 6], u32)> {
        let links: Vec<_> = self.handle.link().get().match_index(ifindex).execute().try_collect().await?;
        let link = links.first().ok_or_else(|| anyhow!("interface {ifindex} not found"))?;
        let mac = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) if mac.len() == 6 => mac.as_slice().try_into().ok(),
                _ => None,
            })
            .ok_or_else(|| anyhow!("interface {ifindex} has no Ethernet address"))?;
        let mtu = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        });
        Ok((mac, mtu.unwrap_or(lb_common::DEFAULT_LINK_MTU)))
    }

    /// The interface the kernel's route to `addr` leaves by.
    pub async fn route_interface(&self, addr: IpAddr) -> Result<u32> {
        Ok(self.route_to(addr).await?.ifindex)
    }

    /// Resolves the L2 paths to `addresses` from the kernel's route and
    /// neighbour tables. Unknown neighbours are resolved by the kernel on our
    /// request; those in `awaited` are waited for, together, up to `timeout`.
    pub async fn resolve_all(
        &self,
        addresses: &[IpAddr],
        awaited: &std::collections::HashSet<IpAddr>,
        timeout: Duration,
    ) -> HashMap<IpAddr, Result<L2Path, String>> {
        let mut results = HashMap::new();
        let mut pending = Vec::new(); // (address, ifindex, next hop, path without dst_mac)
        let mut links: HashMap<u32, ([u8; 6], u32)> = HashMap::new();
        let routes = futures::future::join_all(addresses.iter().map(|a| self.route_to(*a))).await;
        for (address, route) in addresses.iter().zip(routes) {
            let route = match route {
                Ok(route) => route,
                Err(err) => {
                    results.insert(*address, Err(format!("{err:#}")));
                    continue;
                }
            };
            let (src_mac, link_mtu) = match links.get(&route.ifindex) {
                Some(link) => *link,
                None => match self.link_of(route.ifindex).await {
                    Ok(link) => *links.entry(route.ifindex).or_insert(link),
                    Err(err) => {
                        results.insert(*address, Err(format!("{err:#}")));
                        continue;
                    }
                },
            };
            let mtu = route.mtu.unwrap_or(link_mtu).min(u16::MAX as u32) as u16;
            let path = L2Path { ifindex: route.ifindex, src_mac, dst_mac: [0; 6], mtu, source: route.source };
            pending.push((*address, route.ifindex, route.next_hop, path));
        }

        let deadline = tokio::time::Instant::now() + timeout;
        let mut asked = false;
        while !pending.is_empty() {
            let neighbours = match self.neighbour_macs().await {
                Ok(n) => n,
                Err(err) => {
                    for (address, ..) in pending.drain(..) {
                        results.insert(address, Err(format!("{err:#}")));
                    }
                    break;
                }
            };
            pending.retain(|(address, ifindex, next_hop, path)| {
                let Some(dst_mac) = neighbours.get(&(*ifindex, *next_hop)) else {
                    return true;
                };
                results.insert(*address, Ok(L2Path { dst_mac: *dst_mac, ..*path }));
                false
            });
            if pending.is_empty() {
                break;
            }
            // Asked for before giving up, so that even without waiting the
            // kernel resolves them (and announces it).
            if !asked {
                for (_, ifindex, next_hop, _) in &pending {
                    self.request_resolution(*ifindex, *next_hop).await;
                }
                asked = true;
            }
            let waiting = pending.iter().any(|(address, ..)| awaited.contains(address));
            if !waiting || tokio::time::Instant::now() >= deadline {
                for (address, ifindex, next_hop, _) in pending.drain(..) {
                    results.insert(
                        address,
                        Err(format!("no neighbour entry for {next_hop} on interface {ifindex} after {timeout:?}")),
                    );
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(lb_common::NEIGHBOUR_POLL_MS)).await;
        }
        results
    }

    /// The kernel's route to `addr` (`ip route get ADDR`).
    async fn route_to(&self, addr: IpAddr) -> Result<Route> {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let request = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, prefix)
            .context("building route request")?
            .build();
        let routes: Vec<_> = self
            .handle
            .route()
            .get(request)
            .execute()
            .try_collect()
            .await
            .with_context(|| format!("no route to {addr}"))?;
        let route = routes.first().ok_or_else(|| anyhow!("no route to {addr}"))?;
        let mut ifindex = None;
        let mut next_hop = addr;
        let mut source = None;
        let mut mtu = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Oif(index) => ifindex = Some(*index),
                RouteAttribute::Gateway(gw) | RouteAttribute::PrefSource(gw) => {
                    let address = match gw {
                        RouteAddress::Inet(a) => IpAddr::V4(*a),
                        RouteAddress::Inet6(a) => IpAddr::V6(*a),
                        _ => continue,
                    };
                    if matches!(attr, RouteAttribute::Gateway(_)) {
                        next_hop = address;
                    } else {
                        source = Some(address);
                    }
                }
                RouteAttribute::Metrics(metrics) => {
                    mtu = metrics.iter().find_map(|m| match m {
                        RouteMetric::Mtu(mtu) if *mtu > 0 => Some(*mtu),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        let ifindex = ifindex.ok_or_else(|| anyhow!("route to {addr} has no output interface"))?;
        Ok(Route { ifindex, next_hop, source, mtu })
    }

    /// Every usable neighbour entry: (ifindex, address) → MAC.
    async fn neighbour_macs(&self) -> Result<HashMap<(u32, IpAddr), [u8; 6]>> {
        let neighbours: Vec<_> =
            self.handle.neighbours().get().execute().try_collect().await.context("dumping neighbours")?;
        let mut macs = HashMap::new();
        for neigh in neighbours {
            if !usable(neigh.header.state) {
                continue;
            }
            let mut dst = None;
            let mut mac = None;
            for attr in &neigh.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
                    NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
                    _ => {}
                }
            }
            if let (Some(dst), Some(mac)) = (dst, mac) {
                macs.insert((neigh.header.ifindex, dst), mac);
            }
        }
        Ok(macs)
    }

    /// `ip neigh add ADDR dev IF use`: the kernel creates the entry and sends
    /// its ARP request / neighbour solicitation. An existing entry is fine.
    async fn request_resolution(&self, ifindex: u32, addr: IpAddr) {
        let result = self
            .handle
            .neighbours()
            .add(ifindex, addr)
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            .execute()
            .await;
        if let Err(err) = result {
            log::debug!("neighbour resolution request for {addr} on {ifindex}: {err}");
        }
    }
}

fn usable(state: NeighbourState) -> bool {
    matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    )
}
