//! `xdplb decap`: the backend side of tunnel forwarding. Attaches the
//! decapsulation XDP program (`lb-ebpf/src/bin/xdp_decap.rs`) to an
//! interface and pins its link and maps, so that it stays attached when the
//! command exits; run again, it swaps in a new program (another GUE port)
//! and refreshes the host's addresses; `--detach` removes it.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    EbpfLoader,
    maps::{HashMap, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{AddressKey, DecapCounter, MAX_DECAP_ADDRESSES};

use crate::{
    config::XdpModeConfig,
    dataplane::{pins, planner},
};

/// The decapsulation program built by build.rs.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-decap"));

const PROGRAM: &str = "xdplb_decap";
const ADDRESSES: &str = "DECAP_ADDRESSES";
const COUNTERS: &str = "DECAP_COUNTERS";
const GLOBAL_GUE_PORT: &str = "GUE_PORT";

/// Where an interface's decapsulation state is pinned by default.
pub fn default_pin_dir(interface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/xdplb/decap").join(interface)
}

/// Attaches (or updates) decapsulation on `interface`; returns a report.
pub fn attach(interface: &str, gue_port: u16, mode: XdpModeConfig, pin_dir: &Path) -> Result<String> {
    pins::prepare(pin_dir)?;
    let gue_port_be = gue_port.to_be();
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_GUE_PORT, &gue_port_be, true)
        .map_pin_path(ADDRESSES, pin_dir.join(ADDRESSES))
        .map_pin_path(COUNTERS, pin_dir.join(COUNTERS))
        .load(DECAP_OBJECT)
        .context("loading the decapsulation program")?;
    let program: &mut Xdp =
        ebpf.program_mut(PROGRAM).ok_or_else(|| anyhow!("program {PROGRAM} missing"))?.try_into()?;
    program.load().context("verifying the decapsulation program")?;
    let link_pin = pins::link_pin(pin_dir);
    let action = if link_pin.exists() {
        let pinned = PinnedLink::from_pin(&link_pin)
            .with_context(|| format!("opening the pinned link {}", link_pin.display()))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).context("the pinned link is not an XDP link")?;
        program.attach_to_link(link).context("swapping the decapsulation program (BPF_LINK_UPDATE)")?;
        "updated"
    } else {
        let mode = match mode {
            XdpModeConfig::Driver => XdpMode::Driver,
            XdpModeConfig::Skb => XdpMode::Skb,
        };
        let id = program
            .attach(interface, mode)
            .with_context(|| format!("attaching XDP to {interface} (is another XDP program attached there?)"))?;
        let link = FdLink::try_from(program.take_link(id)?).context("XDP link as a BPF link")?;
        link.pin(&link_pin).with_context(|| format!("pinning the link at {}", link_pin.display()))?;
        "attached"
    };
    let local = local_addresses()?;
    let mut addresses: HashMap<_, AddressKey, u32> =
        HashMap::try_from(ebpf.map_mut(ADDRESSES).ok_or_else(|| anyhow!("map {ADDRESSES} missing"))?)?;
    let stale: Vec<AddressKey> = addresses.keys().filter_map(|k| k.ok()).collect();
    for key in stale {
        addresses.remove(&key).context("clearing the old local addresses")?;
    }
    for address in local.iter().take(MAX_DECAP_ADDRESSES as usize) {
        let key =
            AddressKey { addr: planner::address_words(*address), family: planner::family(*address), _pad: [0; 3] };
        addresses.insert(key, 1, 0).with_context(|| format!("adding local address {address}"))?;
    }
    let listed: Vec<String> = local.iter().map(|a| a.to_string()).collect();
    Ok(format!(
        "decap {action} on {interface}: IPIP (4in4, 6in6, 4in6, 6in4) and GUE on UDP port {gue_port} \
         addressed to {}; pinned in {}\n{}",
        listed.join(", "),
        pin_dir.display(),
        counters_text(pin_dir)?
    ))
}

/// Detaches decapsulation from the interface pinned in `pin_dir`.
pub fn detach(interface: &str, pin_dir: &Path) -> Result<String> {
    if !pins::link_pin(pin_dir).exists() {
        return Ok(format!("decap is not attached to {interface} (nothing pinned in {})\n", pin_dir.display()));
    }
    let counters = counters_text(pin_dir)?;
    // Unpinning drops the last reference to the link: the kernel detaches.
    std::fs::remove_dir_all(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(format!("decap detached from {interface}; final counters:\n{counters}"))
}

/// The counters of the decapsulation pinned in `pin_dir`.
pub fn counters(pin_dir: &Path) -> Result<Vec<(DecapCounter, u64)>> {
    let path = pin_dir.join(COUNTERS);
    let map = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("decap is not attached here (no {})", path.display()))?;
    let array: PerCpuArray<_, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map))?;
    DecapCounter::ALL.iter().map(|c| Ok((*c, array.get(&(*c as u32), 0)?.iter().sum()))).collect()
}

pub fn counters_text(pin_dir: &Path) -> Result<String> {
    Ok(counters(pin_dir)?.iter().map(|(c, n)| format!("  {:<20} {n}\n", c.name())).collect())
}

/// Every address configured on this host (this network namespace).
fn local_addresses() -> Result<Vec<IpAddr>> {
    let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .context("listing the host's addresses")?
        .filter_map(|ifaddr| {
            let address = ifaddr.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}
