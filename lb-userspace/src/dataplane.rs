//! The kernel side of the agent: loads the embedded XDP program, attaches it,
//! and executes the reconciler's map writes. Only `apply` writes maps.

use std::collections::HashSet;

use anyhow::{Context as _, Result, anyhow};
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    Backend, FLOW_F_FINISHED, FlowKey, FlowState, GLOBAL_COUNTER_COUNT, GlobalCounter, PROTO_UDP, TrafficCounters,
    VipAddressKey, VipInfo, VipKey, names,
};

use crate::{pins, reconcile::MapWrite};

/// The XDP object built by build.rs from `lb-ebpf`.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The benchmark's baseline, generator and sink programs (lb-ebpf's
/// `xdp-baselines`), for `cargo xtask bench`.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-baselines"));

/// Load-time parameters of the data plane.
#[derive(Clone, Debug)]
pub struct DataplaneParams {
    pub ring_size: u32,
    pub max_services: u32,
    pub conntrack_size: u32,
    pub udp_idle_timeout_ns: u64,
    /// Where maps and link are pinned (`PIN_DIR/layout-N`); `None` keeps
    /// everything private to this process (tests, benchmarks).
    pub pin_dir: Option<PathBuf>,
}

impl DataplaneParams {
    fn ring_entries(&self) -> Result<u32> {
        self.ring_size.checked_mul(self.max_services).ok_or_else(|| anyhow!("ring_size × max_services overflows"))
    }
}

/// eBPF-side debug logging (aya-log), a load-time setting of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugLog {
    Off,
    On,
}

impl DebugLog {
    fn level(self) -> u8 {
        match self {
            DebugLog::Off => 0,
            DebugLog::On => aya_log::Level::Debug as u8,
        }
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    params: DataplaneParams,
    /// The XDP link, pinned at `PIN_DIR/layout-N/link` when pinning.
    link: Option<FdLink>,
    debug_log: DebugLog,
    /// Forwards eBPF log records to `log` while debug logging is on.
    logger: Option<tokio::task::JoinHandle<()>>,
    /// Ring rewrites applied, for metrics.
    pub ring_writes: u64,
}

impl Dataplane {
    /// Loads the program; its maps are the pinned ones when they exist
    /// (checked for compatibility first), else new ones (pinned when
    /// pinning). Nothing is attached yet.
    pub fn load(params: DataplaneParams, debug_log: DebugLog) -> Result<Self> {
        let ebpf = load_object(&params, debug_log)?;
        Ok(Self { ebpf, params, link: None, debug_log, logger: None, ring_writes: 0 })
    }

    /// Whether the previous agent left a pinned link to adopt.
    pub fn has_pinned_link(&self) -> bool {
        self.params.pin_dir.as_deref().is_some_and(|dir| pins::link_pin(dir).exists())
    }

    pub fn params(&self) -> &DataplaneParams {
        &self.params
    }

    pub fn program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(names::PROGRAM)
            .ok_or_else(|| anyhow!("program {} missing", names::PROGRAM))?
            .try_into()?)
    }

    /// Attaches to `interface`, or, when a previous agent left a pinned
    /// link, swaps this program onto that link in one atomic step
    /// (BPF_LINK_UPDATE): packets never see a moment without a program.
    /// Returns whether it adopted a link.
    pub fn attach_or_adopt(&mut self, interface: &str, mode: XdpMode) -> Result<bool> {
        let pin = self.params.pin_dir.as_deref().map(pins::link_pin);
        if let Some(pin) = pin.as_deref().filter(|p| p.exists()) {
            let pinned = PinnedLink::from_pin(pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
            self.link = Some(swap_onto(&mut self.ebpf, FdLink::from(pinned))?);
            return Ok(true);
        }
        let program = xdp_program(&mut self.ebpf)?;
        let id = program.attach(interface, mode).with_context(|| {
            format!(
                "attaching XDP to {interface} in {mode:?} mode (EBUSY means another XDP program, \
                 perhaps another xdplb, is attached there)"
            )
        })?;
        let link = FdLink::try_from(program.take_link(id)?).context("XDP link as a BPF link")?;
        self.link = Some(match pin {
            Some(pin) => {
                FdLink::from(link.pin(&pin).with_context(|| format!("pinning the link at {}", pin.display()))?)
            }
            None => link,
        });
        Ok(false)
    }

    /// Loads the program again with another debug-log setting and swaps it
    /// onto the link; the maps are shared, so no state is lost.
    pub fn set_debug_log(&mut self, debug_log: DebugLog) -> Result<()> {
        let mut ebpf = load_object(&self.params, debug_log)?;
        if let Some(link) = self.link.take() {
            match swap_onto(&mut ebpf, link) {
                Ok(link) => self.link = Some(link),
                Err(err) => return Err(err.context("swapping the program")),
            }
        }
        if let Some(task) = self.logger.take() {
            task.abort();
        }
        self.ebpf = ebpf;
        self.debug_log = debug_log;
        if debug_log == DebugLog::On {
            self.logger = Some(forward_ebpf_logs(&mut self.ebpf)?);
        }
        Ok(())
    }

    pub fn debug_log(&self) -> DebugLog {
        self.debug_log
    }

    /// Ends this process's hold on the data plane. With `detach`, the link
    /// and every pinned map are removed and the program stops; otherwise
    /// they stay pinned and the program keeps forwarding with the last state.
    pub fn shutdown(&mut self, detach: bool) -> Result<()> {
        let link = self.link.take();
        if !detach {
            drop(link);
            return Ok(());
        }
        if let Some(root) = self.params.pin_dir.as_deref().and_then(Path::parent) {
            pins::remove_all(root)?;
        }
        drop(link); // the last reference: the kernel detaches the program
        Ok(())
    }

    /// The kernel's id of the loaded program (changes with every swap).
    pub fn program_id(&self) -> Result<u32> {
        Ok(self.program()?.info()?.id())
    }

    /// Size of the program after the verifier's rewrites, in bytes.
    pub fn program_size(&self) -> Result<u32> {
        Ok(self.program()?.info()?.size_translated().unwrap_or(0))
    }

    /// Executes the writes in order. Stops at the first failure, naming it.
    pub fn apply(&mut self, writes: &[MapWrite]) -> Result<()> {
        for write in writes {
            self.apply_one(write).with_context(|| format!("map write {}", describe(write)))?;
        }
        Ok(())
    }

    fn apply_one(&mut self, write: &MapWrite) -> Result<()> {
        match write {
            MapWrite::AddEgressDevice { ifindex } => {
                let mut map: DevMapHash<&mut MapData> = self.map_mut(names::EGRESS_DEVICES)?;
                map.insert(*ifindex, *ifindex, None, 0)?;
            }
            MapWrite::SetBackend { id, backend } => {
                let mut map: Array<&mut MapData, Backend> = self.map_mut(names::BACKENDS)?;
                map.set(*id, backend, 0)?;
            }
            MapWrite::ClearBackend { id } => {
                let mut map: Array<&mut MapData, Backend> = self.map_mut(names::BACKENDS)?;
                map.set(*id, Backend::default(), 0)?;
                // A free slot starts its next life with no flows counted.
                let mut active: Array<&mut MapData, u64> = self.map_mut(names::ACTIVE_FLOWS)?;
                active.set(*id, 0, 0)?;
                let mut correction: Array<&mut MapData, i64> = self.map_mut(names::ACTIVE_FLOWS_CORRECTION)?;
                correction.set(*id, 0, 0)?;
            }
            MapWrite::SetWildcardVips { count } => {
                let mut map: Array<&mut MapData, u32> = self.map_mut(names::WILDCARD_VIPS)?;
                map.set(0, count, 0)?;
            }
            MapWrite::SetActiveCorrection { id, correction } => {
                let mut map: Array<&mut MapData, i64> = self.map_mut(names::ACTIVE_FLOWS_CORRECTION)?;
                map.set(*id, correction, 0)?;
            }
            MapWrite::SetRingSlots { vip_id, slots } => {
                self.ring_writes += 1;
                let base = vip_id * self.params.ring_size;
                let mut map: Array<&mut MapData, u32> = self.map_mut(names::RINGS)?;
                for (slot, backend_id) in slots {
                    map.set(base + slot, backend_id, 0)?;
                }
            }
            MapWrite::SetVip { key, info } => {
                let mut map: HashMap<&mut MapData, VipKey, VipInfo> = self.map_mut(names::VIPS)?;
                map.insert(key, info, 0)?;
            }
            MapWrite::RemoveVip { key } => {
                let mut map: HashMap<&mut MapData, VipKey, VipInfo> = self.map_mut(names::VIPS)?;
                map.remove(key)?;
            }
            MapWrite::AddVipAddress { key } => {
                let mut map: HashMap<&mut MapData, VipAddressKey, u32> = self.map_mut(names::VIP_ADDRESSES)?;
                map.insert(key, 1, 0)?;
            }
            MapWrite::RemoveVipAddress { key } => {
                let mut map: HashMap<&mut MapData, VipAddressKey, u32> = self.map_mut(names::VIP_ADDRESSES)?;
                map.remove(key)?;
            }
        }
        Ok(())
    }

    fn map_mut<'a, T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>>(
        &'a mut self,
        name: &str,
    ) -> Result<T> {
        let map = self.ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from object"))?;
        Ok(T::try_from(map)?)
    }

    fn map<'a, T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>>(&'a self, name: &str) -> Result<T> {
        let map = self.ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from object"))?;
        Ok(T::try_from(map)?)
    }

    /// Global counters summed over CPUs, in `GlobalCounter::ALL` order.
    pub fn global_counters(&self) -> Result<Vec<(GlobalCounter, u64)>> {
        let map: PerCpuArray<&MapData, u64> = self.map(names::GLOBAL_COUNTERS)?;
        let mut out = Vec::with_capacity(GLOBAL_COUNTER_COUNT as usize);
        for counter in GlobalCounter::ALL {
            let values = map.get(&(counter as u32), 0)?;
            out.push((counter, values.iter().sum()));
        }
        Ok(out)
    }

    pub fn vip_counters(&self, vip_id: u32) -> Result<TrafficCounters> {
        self.traffic_counters(names::VIP_COUNTERS, vip_id)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<TrafficCounters> {
        self.traffic_counters(names::BACKEND_COUNTERS, backend_id)
    }

    fn traffic_counters(&self, name: &str, index: u32) -> Result<TrafficCounters> {
        let map: PerCpuArray<&MapData, TrafficCounters> = self.map(name)?;
        let values = map.get(&index, 0)?;
        Ok(values.iter().fold(TrafficCounters::default(), |mut sum, c| {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.new_flows += c.new_flows;
            sum
        }))
    }

    /// One pass over the connection table: active flows per backend id, and
    /// the ids some live entry may still send to.
    pub fn scan_flows(&self, tcp_idle_timeout_ns: u64) -> Result<FlowScan> {
        let now = monotonic_coarse_ns();
        let mut scan = FlowScan::default();
        for (key, state) in self.flows()? {
            let idle = now.saturating_sub(state.last_seen_ns);
            let (timeout, finished) = if key.proto == PROTO_UDP {
                (self.params.udp_idle_timeout_ns, false)
            } else {
                (tcp_idle_timeout_ns, state.flags & FLOW_F_FINISHED != 0)
            };
            if key.proto == PROTO_UDP && idle > timeout {
                continue; // the data plane schedules it afresh
            }
            if !finished || idle < FINISHED_LINGER_NS {
                scan.referenced.insert(state.backend_id);
            }
            if !finished && idle <= timeout {
                *scan.active.entry(state.backend_id).or_insert(0) += 1;
            }
        }
        Ok(scan)
    }
}

/// The maps' contents as a restarted agent finds them.
#[derive(Debug, Default)]
pub struct MapsState {
    pub vips: Vec<(VipKey, VipInfo)>,
    pub backends: Vec<(u32, Backend)>,
    pub rings: std::collections::HashMap<u32, Vec<u32>>,
    pub egress_devices: Vec<u32>,
}

/// A finished TCP flow may still see its last ACKs for a moment.
const FINISHED_LINGER_NS: u64 = 10_000_000_000;

#[derive(Debug, Default)]
pub struct FlowScan {
    pub active: std::collections::HashMap<u32, u64>,
    pub referenced: HashSet<u32>,
}

impl Dataplane {
    /// What the maps hold, for an agent adopting pinned state.
    pub fn read_state(&self) -> Result<MapsState> {
        let vips: HashMap<&MapData, VipKey, VipInfo> = self.map(names::VIPS)?;
        let vips: Vec<(VipKey, VipInfo)> = vips.iter().collect::<Result<_, _>>()?;
        let backends: Array<&MapData, Backend> = self.map(names::BACKENDS)?;
        let mut in_use = Vec::new();
        for id in 1..lb_common::MAX_BACKENDS {
            let backend = backends.get(&id, 0)?;
            if backend.flags & lb_common::BACKEND_F_IN_USE != 0 {
                in_use.push((id, backend));
            }
        }
        let rings: Array<&MapData, u32> = self.map(names::RINGS)?;
        let mut ring_contents = std::collections::HashMap::new();
        for (_, info) in &vips {
            let base = info.id * self.params.ring_size;
            let ring =
                (0..self.params.ring_size).map(|slot| rings.get(&(base + slot), 0)).collect::<Result<Vec<_>, _>>()?;
            ring_contents.insert(info.id, ring);
        }
        let egress: DevMapHash<&MapData> = self.map(names::EGRESS_DEVICES)?;
        let egress_devices = egress.keys().collect::<Result<Vec<_>, _>>()?;
        Ok(MapsState { vips, backends: in_use, rings: ring_contents, egress_devices })
    }

    /// least_conn counts of `ids`: (what the data plane counted, correction).
    pub fn least_conn_counts(&self, ids: &[u32]) -> Result<std::collections::HashMap<u32, (u64, i64)>> {
        let active: Array<&MapData, u64> = self.map(names::ACTIVE_FLOWS)?;
        let correction: Array<&MapData, i64> = self.map(names::ACTIVE_FLOWS_CORRECTION)?;
        ids.iter().map(|id| Ok((*id, (active.get(id, 0)?, correction.get(id, 0)?)))).collect()
    }

    /// A snapshot of the connection table.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowState)>> {
        let map: HashMap<&MapData, FlowKey, FlowState> = self.map(names::CONNTRACK)?;
        Ok(map.iter().collect::<Result<_, _>>()?)
    }
}

fn load_object(params: &DataplaneParams, debug_log: DebugLog) -> Result<Ebpf> {
    let ring_entries = params.ring_entries()?;
    let log_level = debug_log.level();
    let mut loader = EbpfLoader::new();
    loader
        .override_global(names::GLOBAL_RING_SIZE, &params.ring_size, true)
        .override_global(names::GLOBAL_UDP_IDLE_TIMEOUT_NS, &params.udp_idle_timeout_ns, true)
        .override_global(names::GLOBAL_LOG_LEVEL, &log_level, true)
        .map_max_entries(names::RINGS, ring_entries)
        .map_max_entries(names::CONNTRACK, params.conntrack_size)
        .map_max_entries(names::AFFINITY, params.conntrack_size);
    let pin_paths: Vec<(&str, PathBuf)> = match &params.pin_dir {
        Some(dir) => {
            let root = dir.parent().unwrap_or(dir);
            pins::prepare(root)?;
            pins::check_layout(root)?;
            pins::check_pinned_maps(dir, ring_entries, params.conntrack_size)?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            names::PINNED_MAPS.iter().map(|name| (*name, dir.join(name))).collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(XDP_OBJECT).context("loading the XDP object (are you root, with BPF support?)")?;
    // The kernel abandons a verification that a signal interrupts (EAGAIN):
    // that says nothing about the program, so try again.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match xdp_program(&mut ebpf)?.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts < 3 =>
            {
                log::warn!("verification of the XDP program was interrupted; retrying");
            }
            result => {
                result.context("verifying the XDP program")?;
                return Ok(ebpf);
            }
        }
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(names::PROGRAM)
        .ok_or_else(|| anyhow!("program {} missing from object", names::PROGRAM))?
        .try_into()?)
}

/// Puts `ebpf`'s program on `link` (BPF_LINK_UPDATE) and returns the link.
fn swap_onto(ebpf: &mut Ebpf, link: FdLink) -> Result<FdLink> {
    let program = xdp_program(ebpf)?;
    let link = XdpLink::try_from(link).context("the pinned link is not an XDP link")?;
    let id = program.attach_to_link(link).context("BPF_LINK_UPDATE")?;
    Ok(FdLink::try_from(program.take_link(id)?)?)
}

/// Re-logs the program's records at info level under the target `ebpf`:
/// they are emitted at debug level, but asking for them with
/// `xdplb debug on` is reason enough to show them.
struct EbpfRecords;

impl log::Log for EbpfRecords {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        log::logger().log(&log::Record::builder().level(log::Level::Info).target("ebpf").args(*record.args()).build());
    }

    fn flush(&self) {}
}

/// Reads aya-log records from the program's ring buffer into `log`.
fn forward_ebpf_logs(ebpf: &mut Ebpf) -> Result<tokio::task::JoinHandle<()>> {
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, EbpfRecords).context("starting the eBPF log reader")?;
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the
    // same for as long as the AsyncFd (which owns the logger) lives.
    let mut fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow!("watching the eBPF log ring buffer: {}", e.into_parts().1))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// The clock `bpf_ktime_get_coarse_ns` reads.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn describe(write: &MapWrite) -> String {
    match write {
        MapWrite::AddEgressDevice { ifindex } => format!("add egress device {ifindex}"),
        MapWrite::SetBackend { id, .. } => format!("set backend {id}"),
        MapWrite::ClearBackend { id } => format!("clear backend {id}"),
        MapWrite::SetRingSlots { vip_id, slots } => {
            format!("set {} ring slots of VIP {vip_id}", slots.len())
        }
        MapWrite::SetVip { info, .. } => format!("set VIP {}", info.id),
        MapWrite::RemoveVip { .. } => "remove VIP".into(),
        MapWrite::AddVipAddress { .. } => "add VIP address".into(),
        MapWrite::RemoveVipAddress { .. } => "remove VIP address".into(),
        MapWrite::SetActiveCorrection { id, .. } => format!("set the active-flow correction of backend {id}"),
        MapWrite::SetWildcardVips { count } => format!("set the wildcard VIP count to {count}"),
    }
}
