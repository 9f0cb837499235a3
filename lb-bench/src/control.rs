//! Control plane: the Maglev table build (criterion; read from its
//! estimates), the time from a change to maps updated for 1000 backends,
//! the kernel memory of the maps at default sizes, and scale: a service of
//! 10,000 backends and a connection table of a million flows.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use xdplb::{
    config::Protocol,
    dataplane::planner::Reconciler,
    dataplane::{Dataplane, DataplaneParams, DebugLog, TablesInUse, memory},
    netlink::L2Path,
    state::{DesiredBackend, DesiredService},
};

pub struct ControlPlane {
    /// (backends, mean ns) of the Maglev build at 65537 slots.
    pub maglev_build: Vec<(usize, f64)>,
    /// For 1000 backends: each change, timed.
    pub changes: Vec<Change>,
    /// (map, bytes of kernel memory as the kernel reports it, as `xdplb
    /// check` estimates it) at default sizes, no table of persistence or
    /// NAT in use.
    pub memory: Vec<(String, u64, u64)>,
    /// `xdplb check`'s total with the affinity and NAT tables in use.
    pub memory_all_tables: u64,
    pub scale: Scale,
}

pub struct Change {
    pub name: &'static str,
    /// Planned (Maglev tables built, writes computed).
    pub planned: Duration,
    /// Planned and written to the maps.
    pub total: Duration,
    pub writes: usize,
}

pub fn run(criterion: &Path) -> Result<ControlPlane> {
    let mut maglev_build = Vec::new();
    for n in [10, 100, 1000, 10_000] {
        let path = criterion.join(format!("maglev_build/{n}/new/estimates.json"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} (run the criterion bench first)", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        maglev_build.push((n, v["mean"]["point_estimate"].as_f64().unwrap_or(f64::NAN)));
    }
    // Maps of their own for each measurement, private to this process.
    std::thread::spawn(|| -> Result<ControlPlane> {
        lb_testkit::isolate_thread()?;
        // A config without persistence or NAT: those tables are unused.
        let params = DataplaneParams { tables: TablesInUse::default(), ..DataplaneParams::unpinned() };
        let mut dataplane = Dataplane::load(params.clone(), DebugLog::Off)?;
        let cpus = aya::util::nr_cpus().map_err(|(file, err)| anyhow::anyhow!("{file}: {err}"))? as u64;
        let estimated = memory::estimate(&params, cpus)?;
        let memory = map_memory(&dataplane)?
            .into_iter()
            .map(|(name, bytes)| {
                // The kernel truncates map names to 15 characters.
                let estimate = estimated.iter().find(|(n, _)| n.starts_with(&name)).map_or(0, |(_, b)| *b);
                (name, bytes, estimate)
            })
            .collect();
        let all_tables = DataplaneParams { tables: TablesInUse::ALL, ..params };
        let memory_all_tables = memory::estimate(&all_tables, cpus)?.iter().map(|(_, b)| b).sum();
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
            let planned = start.elapsed();
            dataplane.apply(&writes)?;
            changes.push(Change { name, planned, total: start.elapsed(), writes: writes.len() });
            Ok(())
        };
        timed("new service, 1000 backends", &service)?;
        service.backends[500].weight = 3;
        timed("one backend's weight 1 → 3", &service)?;
        service.backends.push(backend(1000, 1));
        timed("one backend added", &service)?;
        service.backends.remove(0);
        timed("one backend removed", &service)?;
        // Scale: one service of 10,000 backends in place of that one.
        let backends = (0..10_000).map(|i| backend(i, 1)).collect();
        let big = DesiredService::dsr("big", "198.18.0.101:80".parse()?, Protocol::Tcp, backends);
        timed("a service of 10,000 backends replaces it", &big)?;
        let ring = dataplane.read_state()?.rings.into_values().next().unwrap_or_default();
        let slotted = ring.iter().collect::<std::collections::BTreeSet<_>>().len();
        drop(dataplane);
        let flow_table = flow_table_at_scale()?;
        Ok(ControlPlane {
            maglev_build,
            changes,
            memory,
            memory_all_tables,
            scale: Scale { backends_with_slots: slotted, flow_table },
        })
    })
    .join()
    .expect("control-plane thread")
}

/// Flows sent through a data plane whose connection table has
/// `SCALE_CONNTRACK_SIZE` entries.
const SCALE_FLOWS: u32 = 1_000_000;
const SCALE_CONNTRACK_SIZE: u32 = 1 << 20;

pub struct Scale {
    /// Distinct backends in the 10,000-backend service's Maglev table.
    pub backends_with_slots: usize,
    pub flow_table: FlowTableScale,
}

pub struct FlowTableScale {
    pub entries: u32,
    pub memory: u64,
    /// New flows sent (one packet each), and found in the table afterwards.
    pub sent: u32,
    pub found: usize,
    pub sent_in: Duration,
}

/// A connection table of 2^20 entries: loaded, its memory, and 1,000,000
/// new flows through the program (one non-SYN packet each, so each is
/// pinned at once), counted in the table afterwards.
fn flow_table_at_scale() -> Result<FlowTableScale> {
    let params = DataplaneParams {
        max_services: 4,
        conntrack_size: SCALE_CONNTRACK_SIZE,
        syn_flood_threshold: 0,
        tables: TablesInUse::default(),
        ..DataplaneParams::unpinned()
    };
    let mut dataplane = Dataplane::load(params, DebugLog::Off)?;
    let memory = map_memory(&dataplane)?.into_iter().find(|(name, _)| name == "CONNTRACK").map_or(0, |(_, b)| b);
    let backend = DesiredBackend {
        address: "198.18.1.11".parse::<IpAddr>()?.into(),
        weight: 1,
        // ifindex 1: the test run's ingress, so XDP_TX.
        path: Some(L2Path {
            ifindex: 1,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            mtu: 1500,
            source: None,
        }),
        down: false,
    };
    let web = DesiredService::dsr("web", "198.18.0.100:80".parse()?, Protocol::Tcp, vec![backend]);
    let (writes, _) = Reconciler::new(lb_common::DEFAULT_RING_SIZE, 4).plan(&[web]);
    dataplane.apply(&writes)?;
    let program = dataplane.program()?;
    let mut out = vec![0u8; 512];
    let start = Instant::now();
    for i in 0..SCALE_FLOWS {
        let frame = crate::frames::tcp4_from(i, crate::frames::ACK);
        aya::programs::TestRun::test_run(
            program,
            aya::programs::TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() },
        )?;
    }
    let sent_in = start.elapsed();
    let found = dataplane.flows()?.len();
    Ok(FlowTableScale { entries: SCALE_CONNTRACK_SIZE, memory, sent: SCALE_FLOWS, found, sent_in })
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
