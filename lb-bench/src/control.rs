//! Control plane: the Maglev table build (criterion; read from its
//! estimates), the time from a change to maps updated for 1000 backends,
//! and the kernel memory of the maps at default sizes.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use xdplb::{
    config::Protocol,
    dataplane::planner::Reconciler,
    dataplane::{Dataplane, DataplaneParams, DebugLog},
    netlink::L2Path,
    state::{DesiredBackend, DesiredService},
};

pub struct ControlPlane {
    /// (backends, mean ns) of the Maglev build at 65537 slots.
    pub maglev_build: Vec<(usize, f64)>,
    /// (change, time to maps updated, map writes) for 1000 backends.
    pub changes: Vec<(&'static str, Duration, usize)>,
    /// (map, bytes of kernel memory) at default sizes.
    pub memory: Vec<(String, u64)>,
}

pub fn run(criterion: &Path) -> Result<ControlPlane> {
    let mut maglev_build = Vec::new();
    for n in [10, 100, 1000] {
        let path = criterion.join(format!("maglev_build/{n}/new/estimates.json"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} (run the criterion bench first)", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        maglev_build.push((n, v["mean"]["point_estimate"].as_f64().unwrap_or(f64::NAN)));
    }
    // Maps of their own for each measurement, private to this process.
    std::thread::spawn(|| -> Result<ControlPlane> {
        lb_testkit::isolate_thread()?;
        let params = DataplaneParams {
            ring_size: lb_common::DEFAULT_RING_SIZE,
            max_services: 64,
            conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
            udp_idle_timeout_ns: 30_000_000_000,
            syn_flood_threshold: lb_common::DEFAULT_SYN_FLOOD_THRESHOLD,
            sync_flows: false,
            pin_dir: None,
        };
        let mut dataplane = Dataplane::load(params, DebugLog::Off)?;
        let memory = map_memory(&dataplane)?;
        let mut reconciler = Reconciler::new(lb_common::DEFAULT_RING_SIZE, 64);
        let backend = |i: usize, weight: u32| DesiredBackend {
            address: IpAddr::from([198, 18, 1 + (i / 250) as u8, (i % 250) as u8 + 1]).into(),
            weight,
            path: Some(L2Path {
                ifindex: 1,
                src_mac: [2, 0, 0, 0, 0, 1],
                dst_mac: [2, 0, 0, 0, (i >> 8) as u8, i as u8],
                mtu: 1500,
                source: None,
            }),
            down: false,
        };
        let backends = (0..1000).map(|i| backend(i, 1)).collect();
        let mut service = DesiredService::dsr("web", "198.18.0.100:80".parse()?, Protocol::Tcp, backends);
        let mut changes = Vec::new();
        let mut timed = |name: &'static str, service: &DesiredService| -> Result<()> {
            let start = Instant::now();
            let (writes, _) = reconciler.plan(std::slice::from_ref(service));
            dataplane.apply(&writes)?;
            changes.push((name, start.elapsed(), writes.len()));
            Ok(())
        };
        timed("new service, 1000 backends", &service)?;
        service.backends[500].weight = 3;
        timed("one backend's weight 1 → 3", &service)?;
        service.backends.push(backend(1000, 1));
        timed("one backend added", &service)?;
        service.backends.remove(0);
        timed("one backend removed", &service)?;
        Ok(ControlPlane { maglev_build, changes, memory })
    })
    .join()
    .expect("control-plane thread")
}

/// Kernel memory (memlock) of each of the program's maps.
fn map_memory(dataplane: &Dataplane) -> Result<Vec<(String, u64)>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut out = Vec::new();
    for id in dataplane.program()?.info()?.map_ids()?.unwrap_or_default() {
        let info = aya::maps::MapInfo::from_id(id)?;
        let fd = info.fd()?;
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
        let memlock =
            fdinfo.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        out.push((info.name_as_str().unwrap_or("?").to_string(), memlock));
    }
    out.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    Ok(out)
}
