//! Throughput through a namespace topology, driven by a traffic generator
//! in live-frames mode (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES,
//! the mechanism xdp-trafficgen uses):
//!
//!   gen ns: g0 ──veth (2 queues)── l0 :lb ns
//!
//! `trafficgen` sends 64-byte frames out of g0, each with the next of 60000
//! source ports (and, for the new-flow frames, the next of 4096 source
//! addresses: every frame a new flow). On l0 runs the program under test: xdplb (the backend sits
//! behind l0, so it answers with XDP_TX; the `udp_64B_ipip` frames go to a
//! service that reaches it through IPIP), the parse + MAC swap + XDP_TX
//! baseline, the same with one connection-table-shaped lookup (the floor of
//! a stateful balancer), the parse + IPIP + XDP_TX baseline, or the
//! counting XDP_DROP sink (what reaches the LB at all).
//! Frames sent back out of l0 are counted by a sink on g0: that is what was
//! delivered towards the backend.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{Xdp, XdpMode},
};
use lb_testkit::generator::Generator;
use xdplb::{
    config::{Forwarding, PortRange, Protocol},
    dataplane::planner::Reconciler,
    dataplane::{Dataplane, DataplaneParams, DebugLog},
    netlink::L2Path,
    state::{DesiredBackend, DesiredNat, DesiredService},
};

use crate::{frames, stats::Samples};

pub struct Throughput {
    pub program: &'static str,
    pub frame: &'static str,
    pub threads: usize,
    /// Million frames per second delivered (for the sink: received).
    pub mpps: Samples,
}

pub const PROGRAMS: [&str; 7] = [
    "xdplb",
    "parse_macswap_tx",
    "parse_flow_lookup_tx",
    "flow_no_common_lru",
    "flow_per_cpu_tables",
    "parse_encap_tx",
    "xdp_drop_sink",
];

/// The frame of every packet of a new flow (the generator cycles through
/// `NEW_FLOW_ADDRESSES` × 60000 five-tuples, more than a run sends).
pub const NEW_FLOWS_FRAME: &str = "tcp_ack_64B_new_flows";
const NEW_FLOW_ADDRESSES: u32 = 4096;

/// The frames `program` is measured with: the connection-table flavours
/// only with established and new TCP flows, which is what they differ in.
fn frames_for(program: &str) -> Vec<(&'static str, Vec<u8>)> {
    let tcp = || frames::tcp4(1024, frames::ACK);
    match program {
        "flow_no_common_lru" | "flow_per_cpu_tables" | "parse_flow_lookup_tx" => {
            vec![("tcp_ack_64B", tcp()), (NEW_FLOWS_FRAME, tcp())]
        }
        _ => vec![
            ("udp_64B", frames::udp4_64()),
            ("tcp_ack_64B", tcp()),
            ("udp_64B_ipip", frames::udp4_64_tunnel()),
            ("udp_64B_nat", frames::udp4_64_nat()),
            (NEW_FLOWS_FRAME, tcp()),
        ],
    }
}

/// Namespaces of this run, removed on drop.
struct Namespaces {
    gen_ns: String,
    lb_ns: String,
}

impl Namespaces {
    fn new() -> Result<Self> {
        let id = std::process::id();
        let this = Namespaces { gen_ns: format!("xbt{id}g"), lb_ns: format!("xbt{id}l") };
        for ns in [&this.gen_ns, &this.lb_ns] {
            ip_cmd("ip", &["netns", "add", ns])?;
            ip_cmd("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip_cmd(
            "ip",
            &[
                "link",
                "add",
                "g0",
                "netns",
                &this.gen_ns,
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
                "type",
                "veth",
                "peer",
                "name",
                "l0",
                "netns",
                &this.lb_ns,
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
            ],
        )?;
        ip_cmd("ip", &["-n", &this.gen_ns, "link", "set", "g0", "up"])?;
        ip_cmd("ip", &["-n", &this.lb_ns, "link", "set", "l0", "up"])?;
        Ok(this)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.gen_ns, &self.lb_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip_cmd(cmd: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(cmd).args(args).status().with_context(|| format!("{cmd} {args:?}"))?;
    if !status.success() {
        bail!("{cmd} {args:?} failed");
    }
    Ok(())
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    lb_testkit::run_in(ns, f)?
}

fn ifindex(ns: &str, dev: &str) -> Result<u32> {
    let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", dev]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).split(':').next().unwrap_or("").trim().parse()?)
}

fn mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = Command::new("ip").args(["-n", ns, "-j", "link", "show", dev]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let text = v[0]["address"].as_str().context("no MAC")?;
    let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {text}"))
}

fn baseline_name(program: &str) -> &'static str {
    match program {
        "xdp_drop_sink" => "sink",
        "parse_encap_tx" => "bench_encap_ipip",
        "parse_flow_lookup_tx" => "bench_flow_lookup",
        "flow_no_common_lru" => "bench_flow_no_common_lru",
        "flow_per_cpu_tables" => "bench_flow_per_cpu_tables",
        _ => "bench_macswap",
    }
}

fn sink_total(ebpf: &Ebpf) -> Result<u64> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(ebpf.map("SINK_COUNT").context("SINK_COUNT")?)?;
    Ok(map.get(&0, 0)?.iter().sum())
}

pub fn run(seconds: f64, rounds: usize) -> Result<Vec<Throughput>> {
    let ns = Namespaces::new()?;
    let l0 = ifindex(&ns.lb_ns, "l0")?;
    let (g0_mac, l0_mac) = (mac(&ns.gen_ns, "g0")?, mac(&ns.lb_ns, "l0")?);

    // Generator side: trafficgen (run, not attached) and the return sink on g0.
    let mut generator = Generator::load(crate::baselines_path()?, &ns.gen_ns, "g0", 2, 1)?;
    let mut new_flows = Generator::load(crate::baselines_path()?, &ns.gen_ns, "g0", 2, NEW_FLOW_ADDRESSES)?;
    let gen_side = in_ns(&ns.gen_ns, move || {
        let mut ebpf = crate::load_baselines()?;
        let sink: &mut Xdp = ebpf.program_mut("sink").context("sink")?.try_into()?;
        sink.load()?;
        sink.attach("g0", XdpMode::Driver)?;
        Ok(ebpf)
    })?;

    // LB side: xdplb with one backend behind l0, and the baselines.
    let (mut xdplb, baselines) = in_ns(&ns.lb_ns, move || {
        let params = DataplaneParams { max_services: 4, ..DataplaneParams::unpinned() };
        let mut dataplane = Dataplane::load(params, DebugLog::Off)?;
        let backend = || DesiredBackend {
            address: "198.18.1.11".parse().unwrap(),
            weight: 1,
            path: Some(L2Path {
                ifindex: l0,
                src_mac: l0_mac,
                dst_mac: g0_mac,
                mtu: 1500,
                source: Some("198.18.2.1".parse().unwrap()),
            }),
            down: false,
        };
        let service = |name: &str, vip: &str, protocol| {
            DesiredService::dsr(name, vip.parse().unwrap(), protocol, vec![backend()])
        };
        let mut reconciler = Reconciler::new(lb_common::DEFAULT_RING_SIZE, 4);
        let (writes, _) = reconciler.plan(&[
            service("dns", "198.18.0.100:53", Protocol::Udp),
            service("web", "198.18.0.100:80", Protocol::Tcp),
            DesiredService { forwarding: Forwarding::Ipip, ..service("tunnel", "198.18.0.100:54", Protocol::Udp) },
            DesiredService {
                forwarding: Forwarding::Nat,
                // Two source addresses: room for the generator's 60000 flows
                // at under half the pool (new flows find a port at once).
                nat: Some(DesiredNat {
                    sources: vec!["198.18.2.101".parse().unwrap(), "198.18.2.102".parse().unwrap()],
                    ports: PortRange::default(),
                    preserve_client: false,
                    exclude: None,
                }),
                ..service("nat", "198.18.0.100:55", Protocol::Udp)
            },
        ]);
        dataplane.apply(&writes)?;
        let mut baselines = crate::load_baselines()?;
        for name in [
            "bench_macswap",
            "bench_flow_lookup",
            "bench_flow_no_common_lru",
            "bench_flow_per_cpu_tables",
            "bench_encap_ipip",
            "sink",
        ] {
            let p: &mut Xdp = baselines.program_mut(name).context("program")?.try_into()?;
            p.load()?;
        }
        Ok((dataplane, baselines))
    })?;
    let mut baselines = baselines;

    let mut results: Vec<Throughput> = Vec::new();
    for round in 0..rounds {
        for program in PROGRAMS {
            // Attach the program under test to l0.
            let lb_ns = ns.lb_ns.clone();
            let (attached_xdplb, attached_baselines, link) = in_ns(&lb_ns, move || {
                let link = match program {
                    "xdplb" => {
                        xdplb.attach_or_adopt("l0", XdpMode::Driver)?;
                        None
                    }
                    name => {
                        let p: &mut Xdp = baselines.program_mut(baseline_name(name)).context("baseline")?.try_into()?;
                        Some(p.attach("l0", XdpMode::Driver)?)
                    }
                };
                Ok((xdplb, baselines, link))
            })?;
            xdplb = attached_xdplb;
            baselines = attached_baselines;

            for (frame_name, frame) in frames_for(program) {
                for threads in [1usize, 2] {
                    let counter = |ebpf: &Ebpf| sink_total(ebpf);
                    let before = if program == "xdp_drop_sink" { counter(&baselines)? } else { counter(&gen_side)? };
                    let sender = if frame_name == NEW_FLOWS_FRAME { &mut new_flows } else { &mut generator };
                    let elapsed = sender.send_for(&frame, Duration::from_secs_f64(seconds), threads)?;
                    // Let the last frames drain.
                    std::thread::sleep(Duration::from_millis(50));
                    let after = if program == "xdp_drop_sink" { counter(&baselines)? } else { counter(&gen_side)? };
                    let mpps = (after - before) as f64 / elapsed.as_secs_f64() / 1e6;
                    match results
                        .iter_mut()
                        .find(|r| r.program == program && r.frame == frame_name && r.threads == threads)
                    {
                        Some(r) => r.mpps.push(mpps),
                        None => results.push(Throughput {
                            program,
                            frame: frame_name,
                            threads,
                            mpps: Samples::from(vec![mpps]),
                        }),
                    }
                }
            }

            // Detach before the next program.
            let lb_ns = ns.lb_ns.clone();
            let (detached_xdplb, detached_baselines) = in_ns(&lb_ns, move || {
                match link {
                    None => xdplb.shutdown(true)?,
                    Some(link) => {
                        let p: &mut Xdp =
                            baselines.program_mut(baseline_name(program)).context("baseline")?.try_into()?;
                        p.detach(link)?;
                    }
                }
                Ok((xdplb, baselines))
            })?;
            xdplb = detached_xdplb;
            baselines = detached_baselines;
        }
        eprintln!("throughput: round {}/{rounds} done", round + 1);
    }
    Ok(results)
}
