//! The kernel side of the agent: the planner that turns desired state into
//! map writes, the one writer that applies them, the readers, and the
//! program's loading, attaching and pinning.

mod batch;
pub mod memory;
mod outgrown;
pub mod pins;
pub mod planner;
pub mod reader;
pub mod scanner;
mod slots;
pub mod writer;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc,
        xdp::XdpLink,
    },
};
use lb_common::{
    Capacity, HALF_OPEN_SHARE, MAP_SPECS, MIN_HALF_OPEN_SIZE, NS_PER_SEC, SLOTS_PER_ELEMENT, UNUSED_TABLE_ENTRIES,
    map_names, names,
};

use self::planner::MapWrite;
pub use self::{
    scanner::FlowScan,
    writer::{WriteFailure, describe},
};

/// The XDP object built by build.rs from `lb-ebpf`.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Test builds only (`--features test-hooks`): the same program built as
/// lb-ebpf-variant (other bytecode, which also counts every packet in
/// `UPGRADE_VARIANT_COUNTER_SLOT`), loaded instead while
/// `XDPLB_TEST_PROGRAM=variant`: what the in-place-upgrade test swaps in.
#[cfg(feature = "test-hooks")]
static XDP_VARIANT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf-variant"));

/// The object to load: this build's program (or, in test builds, the
/// variant when asked for).
fn xdp_object() -> &'static [u8] {
    #[cfg(feature = "test-hooks")]
    if std::env::var_os("XDPLB_TEST_PROGRAM").is_some_and(|v| v == "variant") {
        log::info!("loading the upgrade-test variant of the program (XDPLB_TEST_PROGRAM=variant)");
        return XDP_VARIANT_OBJECT;
    }
    XDP_OBJECT
}

/// Load-time parameters of the data plane.
#[derive(Clone, Debug)]
pub struct DataplaneParams {
    pub ring_size: u32,
    pub max_services: u32,
    pub conntrack_size: u32,
    /// Entries of each NAT table.
    pub nat_table_size: u32,
    pub udp_idle_timeout_ns: u64,
    /// New SYNs per second per CPU above which the CPU counts as flooded (0: never).
    pub syn_flood_threshold: u64,
    /// Report pinned flows in `FLOW_EVENTS` (connection-table sync).
    pub sync_flows: bool,
    /// Where maps and link are pinned (`PIN_DIR/layout-N`); `None` keeps
    /// everything private to this process (tests, benchmarks).
    pub pin_dir: Option<PathBuf>,
    /// Which of the tables only some services need are full size.
    pub tables: TablesInUse,
}

/// The tables only some services need: the affinity table (persistence)
/// and the NAT tables. While no service needs one it has
/// `UNUSED_TABLE_ENTRIES` entries, so the maps of a config cost what its
/// services use; the first service that needs one makes the agent swap in
/// a program with the full-size table (`Dataplane::use_tables`). A table
/// once full size stays so until the pinned state is removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TablesInUse {
    pub affinity: bool,
    pub nat: bool,
}

impl TablesInUse {
    pub const ALL: TablesInUse = TablesInUse { affinity: true, nat: true };

    /// What `services` need.
    pub fn of(services: &[crate::state::DesiredService]) -> Self {
        Self::needed_by(services.iter().map(|s| (s.persistence_timeout_s, s.forwarding)))
    }

    /// What the services of a config file need (before anything runs).
    pub fn of_config(services: &[crate::config::ServiceConfig]) -> Self {
        Self::needed_by(services.iter().map(|s| (s.persistence_timeout_s, s.forwarding)))
    }

    /// From each service's (persistence timeout, forwarding).
    fn needed_by(services: impl Iterator<Item = (u32, crate::config::Forwarding)>) -> Self {
        services.fold(TablesInUse::default(), |tables, (persistence_timeout_s, forwarding)| TablesInUse {
            affinity: tables.affinity || persistence_timeout_s != 0,
            nat: tables.nat || forwarding == crate::config::Forwarding::Nat,
        })
    }

    /// Whether every table `other` needs is full size here.
    pub fn covers(self, other: TablesInUse) -> bool {
        self.union(other) == self
    }

    fn union(self, other: TablesInUse) -> TablesInUse {
        TablesInUse { affinity: self.affinity || other.affinity, nat: self.nat || other.nat }
    }
}

impl DataplaneParams {
    /// The defaults of every capacity and timeout, every table full size,
    /// nothing pinned: what tests and benchmarks start from.
    pub fn unpinned() -> Self {
        DataplaneParams {
            ring_size: lb_common::DEFAULT_RING_SIZE,
            max_services: lb_common::DEFAULT_MAX_SERVICES,
            conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
            udp_idle_timeout_ns: lb_common::DEFAULT_UDP_IDLE_TIMEOUT_S * NS_PER_SEC,
            syn_flood_threshold: lb_common::DEFAULT_SYN_FLOOD_THRESHOLD,
            sync_flows: false,
            pin_dir: None,
            tables: TablesInUse::ALL,
        }
    }

    /// The parameters an agent with `config` starts with.
    pub fn from_config(config: &crate::config::Config, pin_dir: Option<PathBuf>) -> Self {
        let agent = &config.agent;
        DataplaneParams {
            ring_size: *agent.ring_size.get_ref(),
            max_services: *agent.max_services.get_ref(),
            conntrack_size: agent.conntrack_size,
            nat_table_size: *agent.nat_table_size.get_ref(),
            udp_idle_timeout_ns: agent.udp_idle_ns(),
            syn_flood_threshold: agent.syn_flood_threshold,
            sync_flows: config.sync.is_some(),
            pin_dir,
            tables: TablesInUse::of_config(&config.services),
        }
    }

    /// Elements of `RING_SLOTS`.
    fn ring_entries(&self) -> Result<u32> {
        let slots = self
            .ring_size
            .checked_mul(self.max_services)
            .ok_or_else(|| anyhow!("ring_size × max_services overflows"))?;
        Ok(slots.div_ceil(SLOTS_PER_ELEMENT))
    }

    /// The entries a map of the schema has under these parameters.
    pub fn entries(&self, capacity: Capacity, default_entries: u32) -> Result<u32> {
        Ok(match capacity {
            Capacity::Fixed => default_entries,
            Capacity::Conntrack => self.conntrack_size,
            Capacity::Rings => self.ring_entries()?,
            Capacity::Nat if self.tables.nat => self.nat_table_size,
            Capacity::Affinity if self.tables.affinity => self.conntrack_size,
            Capacity::Nat | Capacity::Affinity => UNUSED_TABLE_ENTRIES,
            Capacity::HalfOpen => (self.conntrack_size / HALF_OPEN_SHARE).max(MIN_HALF_OPEN_SIZE),
        })
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
    /// Interfaces whose egress runs the probe-tunnelling program.
    probe_interfaces: std::collections::BTreeSet<u32>,
    /// Interfaces besides the main one where the program runs, because NAT
    /// backends' replies arrive there: ifindex → link (pinned when pinning).
    reply_links: std::collections::BTreeMap<u32, FdLink>,
    /// Programs swapped in since the load: whoever holds second handles to
    /// the maps (`reopen`) opens them again when this moves, since a swap
    /// may bring other maps.
    swaps: u64,
}

impl Dataplane {
    /// Loads the program; its maps are the pinned ones when they exist
    /// (checked for compatibility first), else new ones (pinned when
    /// pinning). Nothing is attached yet.
    pub fn load(mut params: DataplaneParams, debug_log: DebugLog) -> Result<Self> {
        if let Some(dir) = &params.pin_dir {
            params.tables = pins::resolve_tables(dir, params.tables)?;
        }
        let ebpf = load_object(&params, debug_log)?;
        Ok(Self {
            ebpf,
            params,
            link: None,
            debug_log,
            logger: None,
            ring_writes: 0,
            probe_interfaces: Default::default(),
            reply_links: Default::default(),
            swaps: 0,
        })
    }

    /// Programs swapped in since the load (see `reopen`).
    pub fn swaps(&self) -> u64 {
        self.swaps
    }

    /// Whether the program is attached to the main interface.
    pub fn is_attached(&self) -> bool {
        self.link.is_some()
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

    /// Runs the program on exactly the interfaces in `wanted` besides the
    /// main one (where NAT backends' replies arrive): attaches or adopts a
    /// pinned link where it is missing, detaches where it is no longer
    /// needed. Returns what changed, for the log.
    pub fn sync_reply_interfaces(
        &mut self,
        wanted: &std::collections::BTreeSet<u32>,
        mode: XdpMode,
    ) -> Result<Vec<String>> {
        let mut changes = Vec::new();
        let dir = self.params.pin_dir.clone();
        let pinned = dir.as_deref().map(pins::reply_link_interfaces).unwrap_or_default();
        let gone: Vec<u32> = self
            .reply_links
            .keys()
            .copied()
            .chain(pinned.iter().copied())
            .filter(|ifindex| !wanted.contains(ifindex))
            .collect();
        for ifindex in gone {
            if let Some(pin) = dir.as_deref().map(|d| pins::reply_link_pin(d, ifindex)) {
                let _ = std::fs::remove_file(pin);
            }
            if self.reply_links.remove(&ifindex).is_some() || pinned.contains(&ifindex) {
                changes.push(format!("detached from interface {ifindex}: no NAT backend behind it"));
            }
        }
        for &ifindex in wanted {
            if self.reply_links.contains_key(&ifindex) {
                continue;
            }
            let pin = dir.as_deref().map(|d| pins::reply_link_pin(d, ifindex));
            if let Some(pin) = pin.as_deref().filter(|p| p.exists()) {
                let pinned = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
                self.reply_links.insert(ifindex, swap_onto(&mut self.ebpf, FdLink::from(pinned))?);
                continue;
            }
            let interface = nix::net::if_::if_indextoname(ifindex)
                .with_context(|| format!("interface {ifindex}"))?
                .to_string_lossy()
                .into_owned();
            let program = xdp_program(&mut self.ebpf)?;
            let id = program
                .attach(&interface, mode)
                .with_context(|| format!("attaching XDP to {interface} for NAT replies"))?;
            let link = FdLink::try_from(program.take_link(id)?).context("XDP link as a BPF link")?;
            let link = match pin {
                Some(pin) => FdLink::from(link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?),
                None => link,
            };
            self.reply_links.insert(ifindex, link);
            changes.push(format!("attached to {interface} ({mode:?} mode): NAT replies arrive there"));
        }
        Ok(changes)
    }

    /// Runs the probe-tunnelling tc program on `ifindex`'s egress (once per
    /// interface; it goes when this process does).
    pub fn attach_probe_tunnel(&mut self, ifindex: u32) -> Result<()> {
        if self.probe_interfaces.contains(&ifindex) {
            return Ok(());
        }
        let interface = nix::net::if_::if_indextoname(ifindex)
            .with_context(|| format!("interface {ifindex}"))?
            .to_string_lossy()
            .into_owned();
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(names::PROBE_PROGRAM)
            .ok_or_else(|| anyhow!("program {} missing", names::PROBE_PROGRAM))?
            .try_into()?;
        if program.fd().is_err() {
            program.load().context("verifying the probe-tunnelling tc program")?;
        }
        // Kernels before 6.6 attach through a clsact qdisc (one may exist).
        let _ = tc::qdisc_add_clsact(&interface);
        program
            .attach(&interface, TcAttachType::Egress)
            .with_context(|| format!("attaching the probe-tunnelling program to {interface} egress"))?;
        self.probe_interfaces.insert(ifindex);
        log::info!("probes through tunnels leave by {interface}: tc egress program attached");
        Ok(())
    }

    /// Loads the program again with another debug-log setting and swaps it
    /// onto the link; the maps are shared, so no state is lost.
    pub fn set_debug_log(&mut self, debug_log: DebugLog) -> Result<()> {
        self.swap_program(self.params.clone(), debug_log)
    }

    /// Makes the tables `wanted` full size, if they are not yet: the
    /// one-entry tables are unpinned (nothing ever wrote them) and a program
    /// with full-size ones is swapped in; every other map is the pinned one,
    /// so no state is lost. Returns whether it swapped.
    pub fn use_tables(&mut self, wanted: TablesInUse) -> Result<bool> {
        if self.params.tables.covers(wanted) {
            return Ok(false);
        }
        let Some(dir) = &self.params.pin_dir else {
            bail!("the tables of an unpinned data plane cannot grow (its maps would be new)");
        };
        let mut params = self.params.clone();
        params.tables = pins::resolve_tables(dir, self.params.tables.union(wanted))?;
        self.swap_program(params, self.debug_log)?;
        Ok(true)
    }

    /// Loads the program with `params` and `debug_log` and swaps it onto
    /// every link it runs on.
    fn swap_program(&mut self, params: DataplaneParams, debug_log: DebugLog) -> Result<()> {
        let mut ebpf = load_object(&params, debug_log)?;
        if let Some(link) = self.link.take() {
            match swap_onto(&mut ebpf, link) {
                Ok(link) => self.link = Some(link),
                Err(err) => return Err(err.context("swapping the program")),
            }
        }
        for (ifindex, link) in std::mem::take(&mut self.reply_links) {
            let link = swap_onto(&mut ebpf, link).context("swapping the program on a NAT reply interface")?;
            self.reply_links.insert(ifindex, link);
        }
        if let Some(task) = self.logger.take() {
            task.abort();
        }
        self.ebpf = ebpf;
        self.params = params;
        self.debug_log = debug_log;
        self.swaps += 1;
        // The tc links belonged to the old object's program.
        for ifindex in std::mem::take(&mut self.probe_interfaces) {
            self.attach_probe_tunnel(ifindex)?;
        }
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
        let reply_links = std::mem::take(&mut self.reply_links);
        if !detach {
            drop((link, reply_links));
            return Ok(());
        }
        if let Some(root) = self.params.pin_dir.as_deref().and_then(Path::parent) {
            pins::remove_all(root)?;
        }
        drop((link, reply_links)); // the last references: the kernel detaches the program
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

    /// Instructions the verifier processed to accept the program (its
    /// verification cost, which load, debug switches and upgrades pay).
    pub fn verified_instructions(&self) -> Result<u32> {
        Ok(self.program()?.info()?.verified_instruction_count().unwrap_or(0))
    }

    /// Empties both NAT tables, through the one writer (flow entries first,
    /// as the agent's expiry does). For benchmarks, which measure NAT
    /// without an agent to expire translations; the agent never calls it.
    pub fn clear_nat_tables(&mut self) -> Result<()> {
        let (flows, replies) = self.nat_tables()?;
        let writes: Vec<MapWrite> = flows
            .into_iter()
            .map(|(key, _)| MapWrite::RemoveNatFlow { key })
            .chain(replies.into_iter().map(|(key, _)| MapWrite::RemoveNatReply { key }))
            .collect();
        Ok(self.apply(&writes)?)
    }

    /// Executes the writes in order through the one writer.
    pub fn apply(&mut self, writes: &[MapWrite]) -> Result<(), WriteFailure> {
        writer::apply(self, writes)
    }

    fn map_mut<'a, T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>>(
        &'a mut self,
        name: &str,
    ) -> Result<T> {
        let map = self.ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from object"))?;
        Ok(T::try_from(map)?)
    }

    /// `RING_SLOTS`, mapped into this process.
    fn ring_slots(&self) -> Result<slots::SlotTable> {
        use std::os::fd::AsFd as _;
        let name = map_names::RING_SLOTS;
        let Some(aya::maps::Map::Array(data)) = self.ebpf.map(name) else {
            bail!("map {name} missing from object");
        };
        let elements = self.params.entries(Capacity::Rings, 0)?;
        slots::SlotTable::map(data.fd().as_fd(), elements).with_context(|| format!("mapping {name}"))
    }

    fn map<'a, T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>>(&'a self, name: &str) -> Result<T> {
        let map = self.ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from object"))?;
        Ok(T::try_from(map)?)
    }
}

fn load_object(params: &DataplaneParams, debug_log: DebugLog) -> Result<Ebpf> {
    let log_level = debug_log.level();
    let sync_flows = u32::from(params.sync_flows);
    let mut loader = EbpfLoader::new();
    loader
        .override_global(names::GLOBAL_RING_SIZE, &params.ring_size, true)
        .override_global(names::GLOBAL_UDP_IDLE_TIMEOUT_NS, &params.udp_idle_timeout_ns, true)
        .override_global(names::GLOBAL_SYN_FLOOD_THRESHOLD, &params.syn_flood_threshold, true)
        .override_global(names::GLOBAL_SYNC_FLOWS, &sync_flows, true)
        .override_global(names::GLOBAL_LOG_LEVEL, &log_level, true);
    for spec in MAP_SPECS.iter().filter(|spec| spec.capacity != Capacity::Fixed) {
        loader.map_max_entries(spec.name, params.entries(spec.capacity, spec.default_entries)?);
    }
    let mut outgrown = Vec::new();
    let pin_paths: Vec<(&str, PathBuf)> = match &params.pin_dir {
        Some(dir) => {
            let root = dir.parent().unwrap_or(dir);
            pins::prepare(root)?;
            pins::check_layout(root)?;
            outgrown = outgrown::take(dir)?;
            pins::check_pinned_maps(dir, params)?;
            pins::remove_retired(dir)?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            MAP_SPECS.iter().filter(|spec| spec.pinned).map(|spec| (spec.name, dir.join(spec.name))).collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = match loader.load(xdp_object()) {
        Ok(ebpf) => ebpf,
        Err(err) => {
            outgrown::restore(outgrown);
            return Err(err).context("loading the XDP object (are you root, with BPF support?)");
        }
    };
    outgrown::copy_over(&mut ebpf, outgrown)?;
    // The kernel abandons a verification that a signal interrupts (EAGAIN):
    // that says nothing about the program, so try again.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match xdp_program(&mut ebpf)?.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(nix::errno::Errno::EAGAIN as i32) && attempts < 3 =>
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
    // CLOCK_MONOTONIC_COARSE always exists on Linux.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map_or(0, |now| now.tv_sec() as u64 * NS_PER_SEC + now.tv_nsec() as u64)
}
