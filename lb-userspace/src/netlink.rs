//! Kernel routing and neighbour lookups over rtnetlink: where a backend is
//! reached from (egress interface, next hop) and at which MAC address.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute},
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// How a backend is reached at layer 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Path {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
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

    pub async fn mac_of(&self, ifindex: u32) -> Result<[u8; 6]> {
        let links: Vec<_> = self.handle.link().get().match_index(ifindex).execute().try_collect().await?;
        let link = links.first().ok_or_else(|| anyhow!("interface {ifindex} not found"))?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) if mac.len() == 6 => mac.as_slice().try_into().ok(),
                _ => None,
            })
            .ok_or_else(|| anyhow!("interface {ifindex} has no Ethernet address"))
    }

    /// Resolves the L2 paths to `addresses` from the kernel's route and
    /// neighbour tables. Unknown neighbours are resolved by the kernel on our
    /// request; all of them are waited for together, up to `timeout`.
    pub async fn resolve_all(
        &self,
        addresses: &[IpAddr],
        timeout: Duration,
    ) -> HashMap<IpAddr, Result<L2Path, String>> {
        let mut results = HashMap::new();
        let mut pending = Vec::new(); // (address, ifindex, next hop, interface MAC)
        let mut interface_macs: HashMap<u32, [u8; 6]> = HashMap::new();
        let routes = futures::future::join_all(addresses.iter().map(|a| self.route_to(*a))).await;
        for (address, route) in addresses.iter().zip(routes) {
            let (ifindex, next_hop) = match route {
                Ok(route) => route,
                Err(err) => {
                    results.insert(*address, Err(format!("{err:#}")));
                    continue;
                }
            };
            let src_mac = match interface_macs.get(&ifindex) {
                Some(mac) => *mac,
                None => match self.mac_of(ifindex).await {
                    Ok(mac) => *interface_macs.entry(ifindex).or_insert(mac),
                    Err(err) => {
                        results.insert(*address, Err(format!("{err:#}")));
                        continue;
                    }
                },
            };
            pending.push((*address, ifindex, next_hop, src_mac));
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
            pending.retain(|(address, ifindex, next_hop, src_mac)| {
                let Some(dst_mac) = neighbours.get(&(*ifindex, *next_hop)) else {
                    return true;
                };
                results.insert(*address, Ok(L2Path { ifindex: *ifindex, src_mac: *src_mac, dst_mac: *dst_mac }));
                false
            });
            if pending.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                for (address, ifindex, next_hop, _) in pending.drain(..) {
                    results.insert(
                        address,
                        Err(format!("no neighbour entry for {next_hop} on interface {ifindex} after {timeout:?}")),
                    );
                }
                break;
            }
            if !asked {
                for (_, ifindex, next_hop, _) in &pending {
                    self.request_resolution(*ifindex, *next_hop).await;
                }
                asked = true;
            }
            tokio::time::sleep(Duration::from_millis(lb_common::NEIGHBOUR_POLL_MS)).await;
        }
        results
    }

    /// Egress interface and next hop (gateway, or the address itself when it
    /// is on-link) of the kernel's route to `addr`.
    async fn route_to(&self, addr: IpAddr) -> Result<(u32, IpAddr)> {
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
            .with_context(|| format!("no route to backend {addr}"))?;
        let route = routes.first().ok_or_else(|| anyhow!("no route to backend {addr}"))?;
        let mut ifindex = None;
        let mut next_hop = addr;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Oif(index) => ifindex = Some(*index),
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => next_hop = IpAddr::V4(*gw),
                RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => next_hop = IpAddr::V6(*gw),
                _ => {}
            }
        }
        let ifindex = ifindex.ok_or_else(|| anyhow!("route to {addr} has no output interface"))?;
        Ok((ifindex, next_hop))
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
