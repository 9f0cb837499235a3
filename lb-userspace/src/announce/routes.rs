//! The one writer of the announce table: a task that makes the table hold
//! exactly one route per announced VIP, on every change and every few
//! seconds (so a route someone deleted comes back).
//!
//! The routes are `VIP/32` (`/128`) via the agent's interface with
//! protocol `static`: BIRD's kernel protocol with `learn` imports them
//! (it ignores `proto kernel`), and nothing forwards by that table.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures::TryStreamExt as _;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::{sync::watch, task::JoinHandle};

/// How often the table is checked against what it should hold.
const RESYNC_PERIOD: Duration = Duration::from_secs(lb_common::ANNOUNCE_RESYNC_S);

pub struct RouteAnnouncer {
    table: u32,
    ifindex: u32,
    handle: Handle,
    desired: watch::Sender<BTreeSet<IpAddr>>,
    /// `announce` was called (the table is written from then on).
    decided: AtomicBool,
    /// The last failure to write the table, until a sync succeeds.
    error: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl RouteAnnouncer {
    /// Starts the writer with nothing to announce yet; routes a previous
    /// agent left stay until the first `announce`.
    pub fn start(table: u32, ifindex: u32) -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening rtnetlink for the announce table")?;
        tokio::spawn(connection);
        let (desired, mut changes) = watch::channel(BTreeSet::new());
        let error = Arc::new(Mutex::new(None));
        let task = {
            let (handle, error) = (handle.clone(), error.clone());
            tokio::spawn(async move {
                // Nothing is written before the agent's first decision.
                if changes.changed().await.is_err() {
                    return;
                }
                loop {
                    let vips = changes.borrow_and_update().clone();
                    let outcome = sync(&handle, table, ifindex, &vips).await;
                    record(&error, outcome.map_err(|err| format!("announce table {table}: {err:#}")));
                    tokio::select! {
                        changed = changes.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep(RESYNC_PERIOD) => {}
                    }
                }
            })
        };
        Ok(Self { table, ifindex, handle, desired, decided: AtomicBool::new(false), error, task })
    }

    /// The VIPs the table should hold from now on. The first call syncs
    /// the table even when it announces nothing, so that what a previous
    /// agent left is corrected; call it only once the program is attached,
    /// or a restart would withdraw and re-announce every VIP.
    pub fn announce(&self, vips: BTreeSet<IpAddr>) {
        if !self.decided.swap(true, Ordering::Relaxed) {
            self.desired.send_replace(vips);
            return;
        }
        self.desired.send_if_modified(|current| {
            let changed = *current != vips;
            *current = vips;
            changed
        });
    }

    pub fn table(&self) -> u32 {
        self.table
    }

    pub fn last_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Withdraws every VIP now (`xdplb stop`); the writer ends.
    pub async fn withdraw_all(self) -> Result<()> {
        self.task.abort();
        let _ = self.task.await;
        sync(&self.handle, self.table, self.ifindex, &BTreeSet::new()).await
    }
}

/// Keeps the last failure (logged once per distinct message) until a sync
/// succeeds.
fn record(error: &Mutex<Option<String>>, outcome: Result<(), String>) {
    let mut last = error.lock().unwrap_or_else(|e| e.into_inner());
    match outcome {
        Ok(()) => *last = None,
        Err(text) => {
            if last.as_deref() != Some(text.as_str()) {
                log::error!("{text}");
            }
            *last = Some(text);
        }
    }
}

/// Makes `table` hold exactly the routes of `vips`.
async fn sync(handle: &Handle, table: u32, ifindex: u32, vips: &BTreeSet<IpAddr>) -> Result<()> {
    let present = routes_in(handle, table).await?;
    for (destination, route) in &present {
        if !destination.is_some_and(|d| vips.contains(&d) && is_vip_route(route, ifindex)) {
            handle.route().del(route.clone()).execute().await.context("removing a route")?;
            if let Some(vip) = destination {
                log::info!("withdrew {vip} (announce table {table})");
            }
        }
    }
    for vip in vips {
        let present = present.iter().any(|(d, r)| *d == Some(*vip) && is_vip_route(r, ifindex));
        if !present {
            handle
                .route()
                .add(vip_route(*vip, table, ifindex)?)
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding the route of {vip}"))?;
            log::info!("announcing {vip} (announce table {table})");
        }
    }
    Ok(())
}

/// The route that announces `vip`.
fn vip_route(vip: IpAddr, table: u32, ifindex: u32) -> Result<RouteMessage> {
    let host = if vip.is_ipv4() { 32 } else { 128 };
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(vip, host)?
        .table_id(table)
        .output_interface(ifindex)
        .protocol(RouteProtocol::Static)
        .scope(RouteScope::Link)
        .build())
}

/// Whether `route` is what `vip_route` writes (a host route via our
/// interface, nothing else).
fn is_vip_route(route: &RouteMessage, ifindex: u32) -> bool {
    host_destination(route).is_some()
        && route.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == ifindex))
        && !route.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_)))
}

/// The address of a host route (/32 or /128).
fn host_destination(route: &RouteMessage) -> Option<IpAddr> {
    let length = route.header.destination_prefix_length;
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) if length == 32 => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) if length == 128 => Some(IpAddr::V6(*a)),
        _ => None,
    })
}

/// Every route in `table` (both families), with its host address when it
/// is a host route.
async fn routes_in(handle: &Handle, table: u32) -> Result<Vec<(Option<IpAddr>, RouteMessage)>> {
    let mut routes = Vec::new();
    for request in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()] {
        let dump: Vec<RouteMessage> =
            handle.route().get(request).execute().try_collect().await.context("listing routes")?;
        for route in dump.into_iter().filter(|r| table_of(r) == table) {
            routes.push((host_destination(&route), route));
        }
    }
    Ok(routes)
}

fn table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table as u32)
}
