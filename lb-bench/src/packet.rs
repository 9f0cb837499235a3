//! Per-packet cost of the XDP program, by BPF_PROG_TEST_RUN.
//!
//! Every program (xdplb, the XDP_DROP baseline, the parse + MAC swap +
//! XDP_TX baseline) is attached to an idle veth of a private network
//! namespace, so that test runs call it through the XDP dispatcher as the
//! driver would. One call per packet (repeat = 1: a rewritten packet must
//! not be fed back in), the kernel-reported duration averaged over the
//! iterations; rounds interleave programs and fixtures so that drift in the
//! machine's speed hits all of them alike.

use std::{
    net::IpAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp, XdpMode},
};
use lb_common::{FlowKey, FlowState, NatFlow, NatReply};
use xdplb::{
    config::{Forwarding, Protocol, Scheduler},
    dataplane::planner::Reconciler,
    dataplane::{Dataplane, DataplaneParams, DebugLog},
    netlink::L2Path,
    state::{DesiredBackend, DesiredNat, DesiredService},
};

use crate::{frames, stats::Samples};

pub const RING: u32 = lb_common::DEFAULT_RING_SIZE;
/// XDP actions (uapi `enum xdp_action`).
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
/// New NAT flows measured per round: under half the default NAT tables, so
/// that the cost measured is an allocation, not a full table.
const NAT_NEW_FLOWS_PER_ROUND: u32 = 100_000;

/// One measured case: a frame generator, run on every program.
pub struct Fixture {
    pub name: &'static str,
    pub backends: usize,
    /// Frame for call `i` (varies for the new-flow fixtures).
    pub frame: fn(u32) -> Vec<u8>,
    /// Packets sent before measuring (pins flows, fills the table).
    pub warmup: u32,
    pub scheduler: Scheduler,
    pub forwarding: Forwarding,
    /// NAT: the source-port pool, and frames sent before the warm-up ones
    /// (a reply needs its request's translation first).
    pub nat: Option<NatFixture>,
    /// Which load of xdplb measures it.
    pub variant: Variant,
    /// Before its warm-up, xdplb's connection table is emptied and refilled
    /// with this many other flows pinned under the fixture's ring, as a
    /// busy node's table is (leftovers of fixtures with other rings would
    /// stray from it), and so are the baselines' (`BASELINE_FLOW_TABLES`):
    /// the tables then have the same history, which decides where their
    /// entries lie in memory (see `working_set_flow`); 0: left as they are.
    /// Every fixture's table is then checked as the agent's scan checks it
    /// (`Programs::scan_rings`).
    pub steady_flows: u32,
}

/// The xdplb loads the fixtures compare.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// As the agent loads it by default, but for a SYN-flood threshold
    /// that the benchmark's SYN rate never reaches.
    Default,
    /// `syn_flood_threshold = 1`: every SYN after a CPU's first in a second
    /// takes the flood path.
    Flooded,
    /// Connection-table sync on: every pinned flow is reported in the event
    /// ring (which a thread drains, as the agent does).
    Synced,
    /// The default program as right after a ring change, before the
    /// agent's table scan found every pin on the new ring: SYNs look at
    /// the connection table (the others run after such a scan).
    RingChanged,
}

#[derive(Clone, Copy)]
pub struct NatFixture {
    pub ports: &'static str,
    /// How many `nat_source` addresses (0: the route source).
    pub sources: u8,
    pub prime: Option<fn() -> Vec<u8>>,
    /// Backend → client (a reply to the primed flow), not client → backend.
    pub reply: bool,
    /// Calls per round at most: every new flow keeps its translation (the
    /// agent's expiry does not run here), so a round must fit the tables.
    pub max_calls: u32,
}

pub fn fixtures() -> Vec<Fixture> {
    let mut list = Vec::new();
    for backends in [3, 100] {
        // Maglev and DSR, the default service.
        let dsr = |name, frame: fn(u32) -> Vec<u8>, warmup, variant| Fixture {
            name,
            backends,
            frame,
            warmup,
            scheduler: Scheduler::Maglev,
            forwarding: Forwarding::Dsr,
            nat: None,
            variant,
            steady_flows: 0,
        };
        // A new five-tuple per packet, the table warmed to its default size:
        // SYNs (recorded half-open; flooded: nothing recorded; with sync on:
        // nothing reported), and new flows whose first packet is not a SYN
        // (the handshake's ACK after a flooded SYN, a flow moved from another
        // node), which are pinned and, with sync on, reported.
        let syn: fn(u32) -> Vec<u8> = |i| frames::tcp4_from(i, frames::SYN);
        let ack: fn(u32) -> Vec<u8> = |i| frames::tcp4_from(i, frames::ACK);
        for (name, frame, variant, steady) in [
            ("tcp_syn_new_flow", syn, Variant::Default, true),
            ("tcp_syn_new_flow_flooded", syn, Variant::Flooded, true),
            ("tcp_syn_new_flow_synced", syn, Variant::Synced, true),
            ("tcp_syn_new_flow_ring_changed", syn, Variant::RingChanged, true),
            // A connection's first two packets in turn: the SYN, then the
            // client's ACK completing the handshake.
            (
                "tcp_handshake",
                |i| frames::tcp4_from(i / 2, if i % 2 == 0 { frames::SYN } else { frames::ACK }),
                Variant::Default,
                true,
            ),
            ("tcp_ack_new_flow", ack, Variant::Default, false),
            ("tcp_ack_new_flow_synced", ack, Variant::Synced, false),
        ] {
            let table = lb_common::DEFAULT_CONNTRACK_SIZE;
            list.push(Fixture { steady_flows: if steady { table } else { 0 }, ..dsr(name, frame, table, variant) });
        }
        list.extend([
            dsr("tcp_syn", |_| frames::tcp4(40000, frames::SYN), 1, Variant::Default),
            dsr("tcp_ack_established", |_| frames::tcp4(40001, frames::ACK), 1, Variant::Default),
            // The throughput generator's working set: 60000 established flows.
            Fixture {
                steady_flows: lb_common::DEFAULT_CONNTRACK_SIZE,
                ..dsr("tcp_ack_60k_flows", working_set_flow, WORKING_SET, Variant::Default)
            },
            dsr("udp", |_| frames::udp4(40002), 1, Variant::Default),
            dsr("ipv6_tcp_syn", |_| frames::tcp6(40003, frames::SYN), 1, Variant::Default),
            dsr("ipv6_tcp_ack", |_| frames::tcp6(40004, frames::ACK), 1, Variant::Default),
            dsr("non_vip", |_| frames::non_vip(), 0, Variant::Default),
        ]);
    }
    // Each scheduler's new-flow path (SYN from a new source every packet).
    for (name, scheduler, backends) in [
        ("sched_round_robin", Scheduler::RoundRobin, 3),
        ("sched_weighted_round_robin", Scheduler::WeightedRoundRobin, 3),
        ("sched_random", Scheduler::Random, 3),
        ("sched_source_hash", Scheduler::SourceHash, 3),
        ("sched_least_conn", Scheduler::LeastConn, 3),
        ("sched_least_conn", Scheduler::LeastConn, 32),
        ("sched_least_response_time", Scheduler::LeastResponseTime, 3),
    ] {
        list.push(Fixture {
            name,
            backends,
            frame: |i| frames::tcp4_from(i, frames::SYN),
            warmup: 0,
            scheduler,
            forwarding: Forwarding::Dsr,
            nat: None,
            variant: Variant::Default,
            steady_flows: 0,
        });
    }
    // The tunnel paths: the same packets, encapsulated (IPv6 VIP → IPv6 backends).
    let tunnel = |name, frame: fn(u32) -> Vec<u8>, forwarding| Fixture {
        name,
        backends: 3,
        frame,
        warmup: 1,
        scheduler: Scheduler::Maglev,
        forwarding,
        nat: None,
        variant: Variant::Default,
        steady_flows: 0,
    };
    list.extend([
        tunnel("ipip_tcp_syn", |_| frames::tcp4(40010, frames::SYN), Forwarding::Ipip),
        tunnel("ipip_tcp_ack_established", |_| frames::tcp4(40011, frames::ACK), Forwarding::Ipip),
        tunnel("ipip_udp", |_| frames::udp4(40012), Forwarding::Ipip),
        tunnel("ipip_ipv6_tcp_ack", |_| frames::tcp6(40013, frames::ACK), Forwarding::Ipip),
        tunnel("gue_tcp_syn", |_| frames::tcp4(40020, frames::SYN), Forwarding::Gue),
        tunnel("gue_tcp_ack_established", |_| frames::tcp4(40021, frames::ACK), Forwarding::Gue),
        tunnel("gue_udp", |_| frames::udp4(40022), Forwarding::Gue),
        tunnel("gue_ipv6_tcp_ack", |_| frames::tcp6(40023, frames::ACK), Forwarding::Gue),
    ]);
    // NAT, both directions. A new flow takes a source port (8 source
    // addresses: room for every new flow of a round); an established one
    // reuses its translation; a reply is rewritten back and routed by the
    // kernel's FIB to the client (a pool of one port makes it predictable).
    let nat = |name, backends, frame: fn(u32) -> Vec<u8>, warmup, nat: NatFixture| Fixture {
        name,
        backends,
        frame,
        warmup,
        scheduler: Scheduler::Maglev,
        forwarding: Forwarding::Nat,
        nat: Some(nat),
        variant: Variant::Default,
        steady_flows: 0,
    };
    let pool =
        NatFixture { ports: "1024-65535", sources: 8, prime: None, reply: false, max_calls: NAT_NEW_FLOWS_PER_ROUND };
    let one_port = NatFixture {
        ports: "40000-40000",
        sources: 0,
        prime: Some(|| frames::tcp4(40050, frames::SYN)),
        reply: true,
        max_calls: NAT_NEW_FLOWS_PER_ROUND,
    };
    list.extend([
        nat("nat_tcp_syn_new_flow", 3, |i| frames::tcp4_from(i, frames::SYN), 0, pool),
        // A new connection's two packets from the client, in turn: the SYN
        // (a new translation) and the ACK that completes its handshake.
        nat(
            "nat_tcp_handshake",
            3,
            |i| frames::tcp4_from(i / 2, if i % 2 == 0 { frames::SYN } else { frames::ACK }),
            0,
            pool,
        ),
        nat("nat_tcp_ack_established", 3, |_| frames::tcp4(40031, frames::ACK), 1, pool),
        nat("nat_udp", 3, |_| frames::udp4(40032), 1, pool),
        nat("nat_reply_tcp_ack", 1, |_| frames::tcp4_nat_reply(40000, frames::ACK), 0, one_port),
    ]);
    list
}

/// Flows of the `tcp_ack_60k_flows` working set.
const WORKING_SET: u32 = 60_000;

/// Call `i` of `tcp_ack_60k_flows`: the warm-up (the first `WORKING_SET`
/// calls) pins the flows in client order, and every later call visits them
/// in another order, as real traffic does. Visited in the order they were
/// pinned, the flows' entries lie in memory in the order they are read
/// whenever the table hands out its elements in sequence (a fresh table,
/// or one whose free list kept its order), and the prefetcher reads ahead:
/// the same program read 200 ns on such a table and 400 on one whose free
/// list a userspace emptying had shuffled, so the figure followed the
/// table's history, not the program (with `steady_flows`, both tables
/// now have one history).
fn working_set_flow(i: u32) -> Vec<u8> {
    frames::tcp4_from(working_set_client(i), frames::ACK)
}

/// The client of `working_set_flow(i)`.
fn working_set_client(i: u32) -> u32 {
    // 7919 is a prime that does not divide 60000: a permutation, whose
    // neighbours lie 7919 flows apart.
    if i < WORKING_SET { i } else { (i % WORKING_SET) * 7919 % WORKING_SET }
}

/// The first client of `Programs::steady_tables`'s flows: above every
/// fixture's range of new five-tuples (`frames::tcp4_from`).
const STEADY_FLOWS: u32 = 0x7ff0_0000;

/// The programs compared, each attached to its own idle veth.
pub struct Programs {
    pub xdplb: Dataplane,
    /// The same program with `syn_flood_threshold = 1` (the `flooded` fixtures).
    xdplb_flooded: Dataplane,
    /// The same program with connection-table sync on, and the thread that
    /// drains its event ring (the `synced` fixtures).
    xdplb_synced: Dataplane,
    drain: Option<EventDrain>,
    pub reconciler: Reconciler,
    /// The services `configure` last planned.
    desired: Vec<DesiredService>,
    baselines: Ebpf,
}

pub const PROGRAMS: [&str; 12] = [
    "xdplb",
    "xdp_drop",
    "parse_macswap_tx",
    "swap_plus_vip_lookup",
    "swap_plus_flow_lookup",
    "parse_encap_tx",
    "floor",
    "swap_plus_coarse_clock",
    "swap_plus_ns_clock",
    "swap_plus_jiffies",
    "swap_plus_counters",
    "backend_macs",
];

/// Whether `program` is measured on `fixture`: the encapsulation baseline
/// only on the tunnel fixtures, which it matches.
fn applies(program: &str, fixture: &Fixture) -> bool {
    match program {
        "parse_encap_tx" => fixture.forwarding.is_tunnel(),
        // What a clock read, the counters or the backend's MACs cost does
        // not depend on the packet.
        "swap_plus_coarse_clock"
        | "swap_plus_ns_clock"
        | "swap_plus_jiffies"
        | "swap_plus_counters"
        | "backend_macs" => fixture.name == "tcp_ack_established",
        _ => true,
    }
}

/// The baselines with a connection table, and its map: warmed as xdplb's
/// is, and given the same history (`Fixture::steady_flows`).
const BASELINE_FLOW_TABLES: [(&str, &str); 2] = [("floor", "FLOOR_FLOWS"), ("swap_plus_flow_lookup", "ANATOMY_FLOWS")];

/// Idle veths the programs are attached to (`xb0`..).
const VETHS: usize = 19;

impl Programs {
    /// Must run on a thread that has its own network namespace.
    pub fn new() -> Result<Self> {
        // One idle veth per program: xb0..xb18, each with its peer xbNp.
        let ip = |args: &[&str]| -> Result<()> {
            let status = Command::new("ip").args(args).status().context("ip")?;
            if !status.success() {
                bail!("ip {args:?} failed");
            }
            Ok(())
        };
        ip(&["link", "set", "lo", "up"])?;
        for n in 0..VETHS {
            let (dev, peer) = (format!("xb{n}"), format!("xb{n}p"));
            ip(&["link", "add", &dev, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &dev, "up"])?;
            ip(&["link", "set", &peer, "up"])?;
        }
        // NAT replies go to the client's next hop by the kernel's FIB: a
        // route and a neighbour for the client, and forwarding on.
        ip(&["addr", "add", "198.18.2.254/24", "dev", "xb0p"])?;
        ip(&["neigh", "add", "198.18.2.2", "lladdr", "02:77:00:00:00:01", "dev", "xb0p", "nud", "permanent"])?;
        // /proc/sys/net is the opening thread's namespace: this one's.
        std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1")
            .context("enabling forwarding in the benchmark's namespace")?;
        // Flood detection stays on but never trips: one call per packet runs
        // several hundred thousand SYNs a second, above the default
        // threshold, and the fixtures that say "recorded" would measure the
        // flood path for most of their SYNs (hash-scheduled services record
        // nothing then).
        let params = DataplaneParams {
            ring_size: RING,
            max_services: 4,
            syn_flood_threshold: *lb_common::SYN_FLOOD_THRESHOLD.end(),
            ..DataplaneParams::unpinned()
        };
        let mut xdplb_flooded =
            Dataplane::load(DataplaneParams { syn_flood_threshold: 1, ..params.clone() }, DebugLog::Off)?;
        xdplb_flooded.attach_or_adopt("xb7", XdpMode::Driver)?;
        let mut xdplb_synced = Dataplane::load(DataplaneParams { sync_flows: true, ..params.clone() }, DebugLog::Off)?;
        xdplb_synced.attach_or_adopt("xb8", XdpMode::Driver)?;
        let drain = Some(EventDrain::start(xdplb_synced.take_flow_events()?));
        let mut xdplb = Dataplane::load(params, DebugLog::Off)?;
        xdplb.attach_or_adopt("xb0", XdpMode::Driver)?;
        let mut baselines = crate::load_baselines()?;
        for (name, dev) in [
            ("bench_drop", "xb1"),
            ("bench_macswap", "xb2"),
            ("bench_vip_lookup", "xb3"),
            ("bench_flow_lookup", "xb4"),
            ("bench_encap_ipip", "xb5"),
            ("bench_encap_gue", "xb6"),
            ("bench_floor", "xb9"),
            ("bench_floor_ipip", "xb10"),
            ("bench_floor_gue", "xb11"),
            ("bench_clock_coarse", "xb12"),
            ("bench_clock_ns", "xb13"),
            ("bench_clock_jiffies", "xb14"),
            ("bench_floor_nat", "xb15"),
            ("bench_floor_nat_reply", "xb16"),
            ("bench_counters", "xb17"),
            ("bench_backend_macs", "xb18"),
        ] {
            let program: &mut Xdp = baselines.program_mut(name).context("baseline")?.try_into()?;
            program.load()?;
            program.attach(dev, XdpMode::Driver)?;
        }
        Ok(Self {
            xdplb,
            xdplb_flooded,
            xdplb_synced,
            drain,
            reconciler: Reconciler::new(RING, 4),
            desired: Vec::new(),
            baselines,
        })
    }

    /// Programs the maps for `backends` backends under `scheduler`, reached
    /// by `forwarding`.
    pub fn configure(&mut self, fixture: &Fixture) -> Result<()> {
        let (backends, scheduler, forwarding) = (fixture.backends, fixture.scheduler, fixture.forwarding);
        let members = |prefix: &str, v6: bool| -> Vec<DesiredBackend> {
            (0..backends)
                .map(|i| {
                    let address: IpAddr = if v6 {
                        format!("2001:db8:1::{:x}", i + 11).parse().unwrap()
                    } else {
                        format!("198.18.{}.{}", 1 + i / 200, 11 + i % 200).parse().unwrap()
                    };
                    let _ = prefix;
                    DesiredBackend {
                        address: address.into(),
                        weight: 1,
                        // ifindex 1: the test-run ingress (lo), so XDP_TX.
                        path: Some(L2Path {
                            ifindex: 1,
                            src_mac: [2, 0, 0, 0, 0, 1],
                            dst_mac: [2, 0xbe, 0, 0, 0, i as u8],
                            mtu: 1500,
                            source: Some(if v6 { "2001:db8:2::1" } else { "198.18.2.1" }.parse().unwrap()),
                        }),
                        down: false,
                    }
                })
                .collect()
        };
        let service = |name: &str, vip: &str, protocol, v6| DesiredService {
            scheduler,
            forwarding,
            nat: fixture.nat.map(|nat| DesiredNat {
                sources: (0..nat.sources)
                    .map(|n| if v6 { format!("2001:db8:2::{}", n + 1) } else { format!("198.18.2.{}", n + 1) })
                    .map(|a| a.parse().unwrap())
                    .collect(),
                ports: nat.ports.parse().unwrap(),
                preserve_client: false,
                exclude: None,
            }),
            ..DesiredService::dsr(name, vip.parse().unwrap(), protocol, members(name, v6))
        };
        let desired = [
            service("web", "198.18.0.100:80", Protocol::Tcp, false),
            service("dns", "198.18.0.100:53", Protocol::Udp, false),
            service("web6", "[2001:db8::100]:80", Protocol::Tcp, true),
        ];
        let (writes, errors) = self.reconciler.plan(&desired);
        if !errors.is_empty() {
            bail!("{errors:?}");
        }
        self.desired = desired.to_vec();
        // Slots that left their service are freed at once: the agent frees
        // them when its table scan finds no flow left on them, and here
        // every fixture warms its own flows. (A retired NAT slot would also
        // keep the data plane looking for NAT replies on later fixtures.)
        let freed = self.reconciler.collect_retired(&std::collections::HashSet::new());
        for writes in [&writes, &freed] {
            self.xdplb.apply(writes)?;
            self.xdplb_flooded.apply(writes)?;
            self.xdplb_synced.apply(writes)?;
        }
        if let Some(nat) = fixture.nat {
            // Every NAT fixture starts from empty tables (the agent's expiry
            // does not run here), then makes the translations it needs; so
            // does its floor.
            self.xdplb.clear_nat_tables()?;
            self.clear_floor_nat_tables()?;
            if let Some(prime) = nat.prime {
                send(self.xdplb.program()?, std::iter::once(prime()))?;
            }
        }
        Ok(())
    }

    /// Checks the pinned flows against the rings as the agent's table scan
    /// does, after the warm-up, and writes the verdict
    /// (`VIP_F_PINS_FOLLOW_RING`) to every program: their tables are
    /// warmed alike. `RingChanged`: no scan yet, the flag cleared.
    pub fn scan_rings(&mut self, fixture: &Fixture) -> Result<()> {
        if fixture.forwarding == Forwarding::Nat {
            return Ok(()); // NAT flows are pinned by their translations: never flagged
        }
        let following = match fixture.variant {
            Variant::RingChanged => Vec::new(),
            _ => self.dataplane(fixture).pins_following_ring(&self.reconciler.ring_checks())?,
        };
        if self.reconciler.set_pins_follow(&following) {
            let (writes, errors) = self.reconciler.plan(&self.desired);
            if !errors.is_empty() {
                bail!("{errors:?}");
            }
            self.xdplb.apply(&writes)?;
            self.xdplb_flooded.apply(&writes)?;
            self.xdplb_synced.apply(&writes)?;
        }
        Ok(())
    }

    /// The load of xdplb that measures `fixture`.
    fn dataplane(&self, fixture: &Fixture) -> &Dataplane {
        match fixture.variant {
            Variant::Flooded => &self.xdplb_flooded,
            Variant::Synced => &self.xdplb_synced,
            Variant::Default | Variant::RingChanged => &self.xdplb,
        }
    }

    /// Steady tables for `fixture` (`Fixture::steady_flows`), xdplb's and
    /// the baselines' (`BASELINE_FLOW_TABLES`): emptied, then refilled with
    /// flows pinned by their first packet (an ACK), five-tuples far from
    /// any fixture's.
    pub fn steady_tables(&mut self, fixture: &Fixture) -> Result<()> {
        let dataplane = self.dataplane(fixture);
        for name in [lb_common::map_names::CONNTRACK, lb_common::map_names::HALF_OPEN] {
            let map = aya::maps::Map::LruHashMap(dataplane.reopen(name)?);
            empty::<_, FlowState>(aya::maps::HashMap::try_from(map)?)?;
        }
        for (_, table) in BASELINE_FLOW_TABLES {
            let map = self.baselines.map_mut(table).with_context(|| format!("{table} missing from the baselines"))?;
            empty::<_, FlowState>(aya::maps::HashMap::try_from(map)?)?;
        }
        for which in std::iter::once("xdplb").chain(BASELINE_FLOW_TABLES.map(|(program, _)| program)) {
            let flows = (0..fixture.steady_flows).map(|i| frames::tcp4_from(STEADY_FLOWS + i, frames::ACK));
            send(self.program(which, fixture)?, flows)?;
        }
        Ok(())
    }

    /// Empties the NAT floor's tables, as `clear_nat_tables` does xdplb's.
    fn clear_floor_nat_tables(&mut self) -> Result<()> {
        fn clear<V: aya::Pod>(baselines: &mut Ebpf, name: &str) -> Result<()> {
            let map = baselines.map_mut(name).with_context(|| format!("{name} missing from the baselines"))?;
            empty::<_, V>(aya::maps::HashMap::try_from(map)?)
        }
        clear::<NatFlow>(&mut self.baselines, "FLOOR_NAT_FLOWS")?;
        clear::<NatReply>(&mut self.baselines, "FLOOR_NAT_REPLIES")
    }

    fn program(&self, which: &str, fixture: &Fixture) -> Result<&Xdp> {
        Ok(match which {
            "parse_encap_tx" if fixture.forwarding == Forwarding::Gue => {
                self.baselines.program("bench_encap_gue").context("encap")?.try_into()?
            }
            "parse_encap_tx" => self.baselines.program("bench_encap_ipip").context("encap")?.try_into()?,
            "xdplb" => self.dataplane(fixture).program()?,
            "xdp_drop" => self.baselines.program("bench_drop").context("drop")?.try_into()?,
            "swap_plus_vip_lookup" => self.baselines.program("bench_vip_lookup").context("vip")?.try_into()?,
            "swap_plus_flow_lookup" => self.baselines.program("bench_flow_lookup").context("flow")?.try_into()?,
            "swap_plus_coarse_clock" => self.baselines.program("bench_clock_coarse").context("clock")?.try_into()?,
            "swap_plus_ns_clock" => self.baselines.program("bench_clock_ns").context("clock")?.try_into()?,
            "swap_plus_jiffies" => self.baselines.program("bench_clock_jiffies").context("clock")?.try_into()?,
            "swap_plus_counters" => self.baselines.program("bench_counters").context("counters")?.try_into()?,
            "backend_macs" => self.baselines.program("bench_backend_macs").context("backend")?.try_into()?,
            "floor" => {
                let name = match (fixture.forwarding, fixture.nat) {
                    (Forwarding::Ipip, _) => "bench_floor_ipip",
                    (Forwarding::Gue, _) => "bench_floor_gue",
                    (Forwarding::Nat, Some(nat)) if nat.reply => "bench_floor_nat_reply",
                    (Forwarding::Nat, _) => "bench_floor_nat",
                    _ => "bench_floor",
                };
                self.baselines.program(name).context("floor")?.try_into()?
            }
            _ => self.baselines.program("bench_macswap").context("macswap")?.try_into()?,
        })
    }

    /// Runs `fixture` `iterations` times on `which`; mean kernel-reported ns.
    pub fn measure(&self, which: &str, fixture: &Fixture, iterations: u32, offset: u32) -> Result<f64> {
        let program = self.program(which, fixture)?;
        let mut out = vec![0u8; 512];
        let mut total = Duration::ZERO;
        for i in 0..iterations {
            let frame = (fixture.frame)(offset.wrapping_add(i));
            let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() };
            let run = program.test_run(opts)?;
            // A floor that passed or dropped the frame measured a shorter
            // path than its fixture's, and would flatter xdplb.
            if which == "floor" && ![XDP_TX, XDP_REDIRECT].contains(&run.return_value) {
                bail!(
                    "the floor returned XDP action {} on {} (call {i}): not its path",
                    run.return_value,
                    fixture.name
                );
            }
            total += run.duration;
        }
        Ok(total.as_nanos() as f64 / iterations as f64)
    }

    /// Sends the fixture's warm-up packets through xdplb and the baselines
    /// with a connection table, so that their tables hold the same flows.
    pub fn warm_up(&self, fixture: &Fixture, offset: u32) -> Result<()> {
        let programs = std::iter::once("xdplb").chain(BASELINE_FLOW_TABLES.map(|(program, _)| program));
        for which in programs.filter(|p| applies(p, fixture)) {
            send(self.program(which, fixture)?, (0..fixture.warmup).map(|i| (fixture.frame)(offset.wrapping_add(i))))?;
        }
        Ok(())
    }
}

/// Runs `program` on each of `frames` (not measured).
fn send(program: &Xdp, frames: impl Iterator<Item = Vec<u8>>) -> Result<()> {
    let mut out = vec![0u8; 512];
    for frame in frames {
        program.test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() })?;
    }
    Ok(())
}

/// Removes every entry of a flow-keyed hash map.
fn empty<T: std::borrow::BorrowMut<aya::maps::MapData>, V: aya::Pod>(
    mut table: aya::maps::HashMap<T, FlowKey, V>,
) -> Result<()> {
    let keys: Vec<FlowKey> = table.keys().collect::<Result<_, _>>()?;
    for key in keys {
        table.remove(&key)?;
    }
    Ok(())
}

impl Programs {
    /// Flow events drained from the synced program's ring so far.
    pub fn events_drained(&self) -> u64 {
        self.drain.as_ref().map_or(0, |d| d.drained.load(Ordering::Relaxed))
    }
}

impl Drop for Programs {
    fn drop(&mut self) {
        if let Some(drain) = self.drain.take() {
            drain.stop.store(true, Ordering::Relaxed);
            let _ = drain.thread.join();
        }
    }
}

/// Reads the synced program's event ring as fast as the agent would, so
/// that its records are written into free room (a full ring would make
/// the measured path cheaper than the real one).
struct EventDrain {
    stop: Arc<AtomicBool>,
    drained: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl EventDrain {
    fn start(mut ring: aya::maps::RingBuf<aya::maps::MapData>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let drained = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, drained) = (stop.clone(), drained.clone());
            std::thread::spawn(move || {
                // Off the measuring CPU, as the agent would be.
                let _ = lb_testkit::pin_to_cpu(if crate::BENCH_CPU == 0 { 1 } else { 0 });
                while !stop.load(Ordering::Relaxed) {
                    let mut n = 0;
                    while ring.next().is_some() {
                        n += 1;
                    }
                    drained.fetch_add(n, Ordering::Relaxed);
                    if n == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        };
        Self { stop, drained, thread }
    }
}

/// Result of one (fixture, backends, program).
pub struct Cost {
    pub fixture: String,
    pub backends: usize,
    pub program: &'static str,
    pub ns: Samples,
}

/// Measures every fixture (or those named in `chosen`) on every program,
/// `rounds` interleaved rounds.
pub fn run(iterations: u32, rounds: usize, only_quick: bool, chosen: &[String]) -> Result<Vec<Cost>> {
    lb_testkit::pin_to_cpu(crate::BENCH_CPU)?;
    lb_testkit::isolate_thread()?;
    let mut programs = Programs::new()?;
    let mut fixtures = fixtures();
    if !chosen.is_empty() {
        fixtures.retain(|f| chosen.iter().any(|c| c == f.name));
        if fixtures.is_empty() {
            bail!("no per-packet fixture is called {chosen:?}");
        }
    }
    if only_quick {
        for f in &mut fixtures {
            if f.name != "tcp_ack_60k_flows" {
                f.warmup = f.warmup.min(iterations * 4);
            }
            f.steady_flows = f.steady_flows.min(iterations * 4);
        }
    }
    let mut costs: Vec<Cost> = Vec::new();
    for round in 0..rounds {
        for (index, fixture) in fixtures.iter().enumerate() {
            programs.configure(fixture)?;
            // New-flow fixtures continue where the last round stopped, each
            // in a range of five-tuples of its own, so every packet really
            // is a new flow (never a SYN retransmission or a reused port).
            let offset = if fixture.name == "tcp_ack_60k_flows" {
                0 // the same 60000 flows every round: established
            } else {
                let per_round = iterations + fixture.warmup;
                (index as u32 * rounds as u32 + round as u32).wrapping_mul(per_round)
            };
            if fixture.steady_flows > 0 {
                programs.steady_tables(fixture)?;
            }
            programs.warm_up(fixture, offset)?;
            programs.scan_rings(fixture)?;
            let calls = fixture.nat.map_or(iterations, |nat| iterations.min(nat.max_calls));
            for program in PROGRAMS.into_iter().filter(|p| applies(p, fixture)) {
                let ns = programs.measure(program, fixture, calls, offset + fixture.warmup)?;
                match costs
                    .iter_mut()
                    .find(|c| c.fixture == fixture.name && c.backends == fixture.backends && c.program == program)
                {
                    Some(cost) => cost.ns.push(ns),
                    None => costs.push(Cost {
                        fixture: fixture.name.into(),
                        backends: fixture.backends,
                        program,
                        ns: Samples::from(vec![ns]),
                    }),
                }
            }
        }
        eprintln!("per-packet cost: round {}/{rounds} done", round + 1);
    }
    if fixtures.iter().any(|f| f.variant == Variant::Synced) {
        let drained = programs.events_drained();
        eprintln!("sync fixtures: {drained} flow events drained from the synced program's ring");
        if drained == 0 {
            bail!("the program with sync on reported no pinned flow: its fixtures measured nothing of sync");
        }
    }
    Ok(costs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_set_is_visited_out_of_its_pinning_order() {
        let pinned: Vec<u32> = (0..WORKING_SET).map(working_set_client).collect();
        assert_eq!(pinned, (0..WORKING_SET).collect::<Vec<_>>());
        for round in 1..3 {
            let visited: Vec<u32> = (0..WORKING_SET).map(|i| working_set_client(round * WORKING_SET + i)).collect();
            let mut sorted = visited.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, pinned, "every flow once per round");
            assert!(visited.windows(2).all(|w| w[0].abs_diff(w[1]) > 1000), "no neighbours in a row");
        }
    }
}
